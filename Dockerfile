# Tessera as a SageMaker multi-model container (also a plain image: `docker run IMAGE serve
# --auth-mode ...`). SageMaker starts it as `docker run IMAGE serve` with SAGEMAKER_MULTI_MODEL=
# true in its environment, which switches on SageMaker mode (0.0.0.0:$SAGEMAKER_BIND_TO_PORT or
# 8080, no tokens: SageMaker isolates the container's network; LoadModel takes the folder
# SageMaker unpacked a model archive into, /opt/ml/models/<name>/model). The image itself does
# not set it: run anywhere else, it starts in the safe default (loopback only) unless told
# otherwise. Each model.tar.gz is a Tessera archive (`tessera pack`). README.md, section
# "Deployment", has the whole contract.
#
#   docker build -t tessera .
#   # SageMaker's way, on a machine of your own (anyone reaching port 8080 can load models):
#   docker run --rm -p 127.0.0.1:8080:8080 -e SAGEMAKER_MULTI_MODEL=true \
#     -v /path/to/models:/opt/ml/models tessera serve

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The venv (torch 2.11.0, whose libtorch the binary links) lives where the runtime stage keeps
# it: the binary's rpath names that folder.
ENV TESSERA_VENV=/opt/tessera/venv CARGO_TARGET_DIR=/src/target
RUN bash scripts/setup.sh \
 && bash -c 'source scripts/env.sh && cargo build --release -p tessera' \
 && strip target/release/tessera

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/*
# libtorch and its CUDA libraries, at the path the binary was linked against.
COPY --from=build /opt/tessera/venv/lib /opt/tessera/venv/lib
COPY --from=build /src/target/release/tessera /usr/local/bin/tessera
LABEL com.amazonaws.sagemaker.capabilities.multi-models=true
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true
ENV TESSERA_WORK_DIR=/tmp/tessera
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tessera"]
CMD ["serve"]
