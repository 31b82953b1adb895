"""The fault and hostile-input suite: what broken or hostile files, requests, peers and
disks must not take away. Each test is named after the behaviour it protects; each one
failed on the agent before that behaviour was built."""
