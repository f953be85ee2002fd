"""DreamBooth: train the U-Net (and optionally the text encoder) of Stable Diffusion 1.x/2.x."""

import sys

from library.recipe_stub import run

if __name__ == "__main__":
    sys.exit(run("train_db"))
