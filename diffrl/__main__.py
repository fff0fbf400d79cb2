"""``python -m diffrl`` (also under ``torchrun``) runs the command line."""

from diffrl.cli import main

if __name__ == "__main__":
    main()
