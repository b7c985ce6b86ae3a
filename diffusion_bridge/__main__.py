import sys

from diffusion_bridge.cli import main

if __name__ == "__main__":
    sys.exit(main())
