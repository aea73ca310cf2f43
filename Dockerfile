# candela's OpenAI-compatible server, CPU build. For NVIDIA GPUs see Dockerfile.cuda.
#
#   docker build -t candela .
#   docker run -p 8000:8000 -v candela-cache:/cache candela [MODEL] [serve flags...]
#
# MODEL is a Hugging Face repo id, or a folder / .gguf under a mounted path
# (default: the default model). Downloads land in the /cache volume.

# Rust and the toolchain the addon builds with (cargo, rustc; gcc for the C parts).
FROM rust:1.95-bookworm AS rust

FROM node:22-bookworm AS build
COPY --from=rust /usr/local/cargo /usr/local/cargo
COPY --from=rust /usr/local/rustup /usr/local/rustup
ENV CARGO_HOME=/usr/local/cargo RUSTUP_HOME=/usr/local/rustup PATH=/usr/local/cargo/bin:$PATH
WORKDIR /src
# Dependencies first, so a source change does not refetch them. (`npm install`,
# not `npm ci`: the lock cannot list platform packages not yet published.)
COPY package.json package-lock.json ./
RUN npm install --ignore-scripts --no-audit --no-fund
COPY Cargo.toml Cargo.lock tsconfig.json ./
COPY crates crates
COPY native native
COPY scripts scripts
COPY src src
# The release addon and dist/, then only the run-time dependencies.
RUN npm run build && npm prune --omit=dev

FROM node:22-bookworm-slim
# ffmpeg: video codecs beyond the built-in H.264 / VP8 / VP9 decoders.
RUN apt-get update \
  && apt-get install -y --no-install-recommends ffmpeg \
  && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/package.json ./
COPY --from=build /src/node_modules node_modules
COPY --from=build /src/dist dist
# The napi loader and the addon built for this machine's platform.
COPY --from=build /src/native native
COPY --from=build /src/scripts/fetch-default-model.mjs scripts/
# Models (the default model and the Hugging Face cache) live in one volume,
# writable by the non-root user the server runs as.
ENV NODE_ENV=production CANDELA_CACHE_DIR=/cache/candela HF_HOME=/cache/huggingface
RUN mkdir -p /cache && chown 1000:1000 /cache
VOLUME /cache
USER 1000:1000
EXPOSE 8000
# /health is 200 once the model is loaded and 503 while it loads (a first
# download can take minutes, hence the start period).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:8000/health').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["node", "/app/dist/cli.js", "serve", "--host", "0.0.0.0", "--port", "8000"]
