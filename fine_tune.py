"""Fine-tune a Stable Diffusion 1.x/2.x model from a metadata file."""

import sys

from library.recipe_stub import run

if __name__ == "__main__":
    sys.exit(run("fine_tune"))
