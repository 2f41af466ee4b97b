# GPU image: a CUDA PyTorch base plus this project (pyproject.toml, extras train + tensorboard + demo).
#   docker build -t flowers-fastai .
#   docker run --gpus all -v $PWD/cache:/cache -v $PWD/models:/app/models -v $PWD/data:/app/data \
#     flowers-fastai python train.py --arch clip          # weights cached in ./cache across runs
#   docker run --gpus all -p 7860:7860 -v $PWD/models:/app/models flowers-fastai   # the web demo
# torch 2.14.1 built for CUDA 13.0: the build CI tests (torch 2.14.1+cu130), within pyproject.toml's range.
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface TORCH_HOME=/cache/torch XDG_CACHE_HOME=/cache

# The project with its training (+ --tensorboard) and demo extras (the base image's torch satisfies the range).
COPY pyproject.toml README.md ./
COPY flowers_classifier/ flowers_classifier/
COPY flowers_fastai/ flowers_fastai/
COPY flowers_apps/ flowers_apps/
RUN pip install ".[train,tensorboard,demo]"
COPY train.py export.py app.py ./

# Pretrained-weight cache, datasets, runs and exported models live outside the image.
VOLUME ["/cache", "/app/data", "/app/runs", "/app/models"]
EXPOSE 7860
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
