from setuptools import find_packages, setup

setup(
    name="sd-trainer",
    version="0.1.0",
    description="Stable Diffusion 1.x/2.x training scripts (LoRA, DreamBooth, fine-tuning, Textual Inversion) "
    "compatible with kohya-ss/sd-scripts files",
    python_requires=">=3.10",
    packages=find_packages(include=["library", "library.*", "networks", "networks.*", "finetune", "finetune.*", "tools", "tools.*"]),
    py_modules=["train_network", "train_db", "fine_tune", "train_textual_inversion"],
)
