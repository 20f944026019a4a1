"""The command line: argparse, the client verbs that talk to a daemon, log setup and output
formatting. The outermost layer: may import every other package."""
