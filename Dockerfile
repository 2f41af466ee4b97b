# GPU image: a CUDA PyTorch base plus this project (pyproject.toml, extras train + tensorboard + demo).
#   docker build -t flowers-fastai .
#   docker run --gpus all -v $PWD/cache:/cache -v $PWD/models:/app/models -v $PWD/data:/app/data \
#     flowers-fastai python train.py --arch clip          # weights cached in ./cache across runs
#   docker run --gpus all -p 7860:7860 -v $PWD/models:/app/models flowers-fastai   # the web demo
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface TORCH_HOME=/cache/torch XDG_CACHE_HOME=/cache

# The project with its training (+ --tensorboard) and demo extras (the base image's torch satisfies the range).
COPY pyproject.toml README.md ./
COPY flowers_classifier/ flowers_classifier/
COPY flowers_fastai/ flowers_fastai/
RUN pip install ".[train,tensorboard,demo]"
COPY train.py export.py app.py ./

# Pretrained-weight cache, datasets, runs and exported models live outside the image.
VOLUME ["/cache", "/app/data", "/app/runs", "/app/models"]
EXPOSE 7860
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
