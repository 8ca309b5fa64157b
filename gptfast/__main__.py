import sys

from gptfast.cli import main

if __name__ == "__main__":  # the guard matters: `gptfast inspect` spawns workers that re-import this module
    sys.exit(main())
