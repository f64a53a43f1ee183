# One image for all five services. CPU base by default (Triton runs in its interpreter); a CUDA
# base and CUDA wheels by build argument, as compose.yaml's GPU benchmarker does:
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG BASE=python:3.11-slim
FROM ${BASE}
# A CUDA base has no Python; Triton also needs a C compiler and Python headers there to build
# its launcher stubs.
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 KERNELLOOP_STATE_DIR=/state
WORKDIR /app

# Dependencies in their own layer, read from pyproject.toml so the image installs what the
# project declares. torch first, from the index that matches the base, so the CPU image does not
# pull a multi-GB CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
RUN python -m pip install --upgrade pip \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && python -m pip install --index-url ${TORCH_INDEX} "$(grep '^torch' /tmp/requirements.txt)" \
 && python -m pip install -r /tmp/requirements.txt

COPY kernelloop kernelloop
COPY shared shared
COPY observer observer
COPY detector detector
COPY generator generator
COPY benchmarker benchmarker
COPY deployer deployer
RUN python -m pip install --no-deps .
VOLUME /state
CMD ["kernelloop", "--help"]
