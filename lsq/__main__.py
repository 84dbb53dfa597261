from lsq.cli import run

run()
