import sys

from kernelloop.cli import main

sys.exit(main())
