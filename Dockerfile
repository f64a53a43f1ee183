# One image for all five services. CPU base by default; a CUDA base by build argument, e.g.
#   docker build --build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime .
ARG BASE=python:3.11-slim
FROM ${BASE}
WORKDIR /app
ENV PYTHONUNBUFFERED=1 KERNELLOOP_STATE_DIR=/state
COPY pyproject.toml README.md ./
COPY kernelloop kernelloop
COPY shared shared
COPY observer observer
COPY detector detector
COPY generator generator
COPY benchmarker benchmarker
COPY deployer deployer
# torch first and pinned, so the CPU image does not pull a multi-GB CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m pip install --no-cache-dir --index-url ${TORCH_INDEX} "torch>=2.5" \
 && python -m pip install --no-cache-dir .
CMD ["python", "-m", "kernelloop", "--help"]
