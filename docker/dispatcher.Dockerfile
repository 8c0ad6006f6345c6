# The dispatcher (HTTP API and CLI): no GPU, no model.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dispatcher \
 && cp target/release/dispatcher /usr/local/bin/dispatcher

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/dispatcher /usr/local/bin/dispatcher
EXPOSE 8080
ENTRYPOINT ["dispatcher"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
