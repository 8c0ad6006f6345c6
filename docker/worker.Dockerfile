# The worker with candle's CUDA backend and NCCL: built on a CUDA devel image,
# run on the matching CUDA runtime image.
#
#   docker build -f docker/worker.Dockerfile --build-arg CUDA_COMPUTE_CAP=90 .
ARG CUDA_VERSION=12.6.3
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu22.04 AS build
# No GPU is visible while building: say which architecture to compile the
# kernels for (80 = A100, 89 = L4/L40, 90 = H100/H200).
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config libnccl-dev \
 && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p worker --features cuda \
 && cp target/release/worker /usr/local/bin/worker

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu22.04
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libnccl2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/worker /usr/local/bin/worker
# Models downloaded from the Hugging Face hub land here (a volume in compose.yaml).
ENV HF_HOME=/models
VOLUME /models
ENTRYPOINT ["worker"]
CMD ["run", "--device", "cuda"]
