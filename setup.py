"""Packaging for weaktr-hf: WeakTr (plain-ViT weakly-supervised semantic segmentation) for Hugging Face."""

from pathlib import Path

from setuptools import find_packages, setup

# torch / torchvision ranges admit the releases kept on the build machines' local disk
# (torch 2.14.1, torchvision 0.29.1), so an install does not download gigabytes.
install_requires = [
    "torch>=2.4,<=2.14.1",
    "torchvision>=0.19,<=0.29.1",
    "transformers>=5.0,<6",
    "safetensors>=0.4",
    "huggingface-hub>=1.0",
    "timm>=1.0",
    "numpy>=1.24",
    "pillow>=10.0",
    "tqdm>=4.60",
    "datasets>=4.0",  # the data schema is used by evaluation and pseudo-labels, not only by training
]

extras_require = {
    "train": [
        "accelerate>=1.0",
        "evaluate>=0.4",
        "pycocotools>=2.0.7",
        "pydensecrf2>=1.1",
        "tensorboard>=2.14",
    ],
    # weaktr-app, the local web page (gradio_client comes with gradio).
    "app": ["gradio>=6.0,<7"],
    # parameterized: transformers' common test suite (tests/transformers_test_suite.py) needs it; playwright drives
    # chromium in tests/test_app.py.
    "dev": ["pytest>=8.0", "parameterized>=0.9", "playwright>=1.40"],
}
extras_require["all"] = sorted({req for reqs in extras_require.values() for req in reqs})

setup(
    name="weaktr-hf",
    version="0.1.0",
    description="WeakTr weakly-supervised semantic segmentation with plain Vision Transformers, for Hugging Face",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # model_cards/ lives at the repository root and ships inside the package as weaktr_hf.model_cards.
    package_dir={"": "src", "weaktr_hf.model_cards": "model_cards"},
    packages=find_packages("src") + ["weaktr_hf.model_cards"],
    package_data={"weaktr_hf": ["metrics/*.py"], "weaktr_hf.model_cards": ["*.md"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["weaktr-predict = weaktr_hf.predict:main", "weaktr-app = weaktr_hf.app:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
