from agent.node.cli.main import main

raise SystemExit(main())
