import sys

from agent.ctl.main import main

sys.exit(main())
