"""Packaging for weaktr-hf: WeakTr (plain-ViT weakly-supervised semantic segmentation) for Hugging Face."""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# One version source: weaktr_hf/__init__.py.
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "src" / "weaktr_hf" / "__init__.py").read_text(), re.M)[1]

# Floors: the oldest releases the test suite was run with (the CI floors step installs exactly these, .ci/floors.txt).
# torch / torchvision floors are not tested: only torch 2.14.1 / torchvision 0.29.1 can be installed on the project's
# machines; the floors are the releases whose APIs the code uses (scaled_dot_product_attention with a float mask,
# torchvision.transforms.v2). No upper caps below the next major version.
install_requires = [
    "torch>=2.4",
    "torchvision>=0.19",
    "transformers>=5.21.0,<6",
    "safetensors>=0.8.0",
    "huggingface-hub>=1.31.0",
    "timm>=1.0.31",
    "numpy>=2.0.0",
    "pillow>=10.0.0",
    "tqdm>=4.66.3",
    "datasets>=4.7.0",  # the data schema is used by evaluation and pseudo-labels, not only by training
]

extras_require = {
    "train": [
        "accelerate>=1.1.0",
        "evaluate>=0.4.0",
        "pycocotools>=2.0.8",
        "tensorboard>=2.17.1",
    ],
    # The dense CRF of the pseudo-labels and of the paper's evaluation: pydensecrf2 ships as source only, so this
    # extra needs a C++ compiler (Debian/Ubuntu: build-essential). Without it a run says so before training and makes
    # its pseudo-labels without the CRF.
    "crf": ["pydensecrf2>=1.1"],
    # weaktr-app, the local web page (gradio_client comes with gradio).
    "app": ["gradio>=6.0,<7"],
    # parameterized: transformers' common test suite (tests/transformers_test_suite.py) needs it; playwright drives
    # chromium in tests/test_app.py; setuptools: tests/test_packaging.py builds the wheel without build isolation.
    "dev": ["pytest>=8.0.0", "parameterized>=0.9.0", "playwright>=1.40", "setuptools>=70.1"],
}
extras_require["all"] = sorted({req for name, reqs in extras_require.items() if name != "dev" for req in reqs})

setup(
    name="weaktr-hf",
    version=VERSION,
    description="WeakTr weakly-supervised semantic segmentation with plain Vision Transformers, for Hugging Face",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # model_cards/ lives at the repository root and ships inside the package as weaktr_hf.model_cards.
    package_dir={"": "src", "weaktr_hf.model_cards": "model_cards"},
    packages=find_packages("src") + ["weaktr_hf.model_cards"],
    package_data={
        "weaktr_hf": ["metrics/*.py", "demo_backbone/*.safetensors", "demo_backbone/*.json", "demo_backbone/*.md"],
        "weaktr_hf.model_cards": ["*.md"],
    },
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={
        "console_scripts": [
            "weaktr-train = weaktr_hf.train:cli",
            "weaktr-predict = weaktr_hf.predict:cli",
            "weaktr-convert = weaktr_hf.convert_weaktr_original_to_hf:cli",
            "weaktr-app = weaktr_hf.app:main",
        ]
    },
    project_urls={"Paper": "https://arxiv.org/abs/2304.01184"},
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "License :: OSI Approved :: Apache Software License",
        "Operating System :: OS Independent",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
