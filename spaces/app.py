"""WeakTr's page as a Hugging Face Space: try a trained model on your own images.

Set the Space variable WEAKTR_MODEL to the model's Hub id (two ids separated by a space: a segmenter and its step-1
CAM model). Locally: `WEAKTR_MODEL=runs/demo/seg python spaces/app.py` serves the same page on 127.0.0.1:7860.
"""

import os

from weaktr_hf.app import CSS, App, build_app

models = os.environ.get("WEAKTR_MODEL", "").split()
if not models:
    raise SystemExit("Set WEAKTR_MODEL to a WeakTr model's Hub id (Space settings -> Variables), e.g. user/weaktr-seg.")
demo = build_app(App(models))

if __name__ == "__main__":
    # Spaces set GRADIO_SERVER_NAME=0.0.0.0; elsewhere Gradio binds 127.0.0.1.
    demo.queue().launch(css=CSS)
