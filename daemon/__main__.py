from knitwatch.daemon.cli import run

run()
