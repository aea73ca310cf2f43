#!/usr/bin/env python3
"""Run the Dockerfile's final stage without a container engine.

    check-image-layout.py Dockerfile MODEL [SERVE_FLAG...]

CI cannot build the image (no base images to pull), so this checks what the
image would run: it lays out the files that the final stage copies from the
build stage (taken from this checkout after `npm run build`; node_modules as
`npm prune --omit=dev` leaves it, installed afresh with --omit=dev), sets the
stage's ENV (paths under a temp dir), starts its ENTRYPOINT with MODEL on a
free port (SERVE_FLAGs after it: `--device cpu` checks the CUDA image's
files on a machine without a GPU), waits for its HEALTHCHECK command to pass, asks for a chat
completion, and stops it with SIGTERM. Run from the repository root.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def final_stage(path):
    """The final stage's instructions as (keyword, argument) pairs, continuations joined."""
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    stage = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arg = line.partition(" ")
        if keyword.upper() == "FROM":
            stage = []
        stage.append((keyword.upper(), arg.strip()))
    return stage


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    dockerfile, model, flags = sys.argv[1], os.path.abspath(sys.argv[2]), sys.argv[3:]
    root = tempfile.mkdtemp(prefix="candela-image-")
    port = str(free_port())

    def local(path):  # an absolute path of the image, inside the temp root
        return os.path.join(root, path.lstrip("/"))

    workdir, env, entrypoint, healthcheck = "/", {}, None, None
    for keyword, arg in final_stage(dockerfile):
        if keyword == "WORKDIR":
            workdir = os.path.join(workdir, arg)
            os.makedirs(local(workdir), exist_ok=True)
        elif keyword == "ENV":
            for pair in shlex.split(arg):
                k, _, v = pair.partition("=")
                env[k] = local(v) if v.startswith("/") else v
        elif keyword == "COPY" and arg.startswith("--from=build "):
            *sources, dest = shlex.split(arg)[1:]
            dest = os.path.join(workdir, dest)
            for src in sources:
                rel = os.path.relpath(src, "/src")  # the build stage's WORKDIR: this checkout
                target = local(os.path.join(dest, os.path.basename(rel)) if dest.endswith("/") else dest)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                if rel == "node_modules":
                    # What `npm prune --omit=dev` leaves: the locked run-time dependencies.
                    cwd = os.path.dirname(target)
                    shutil.copy2("package.json", cwd)
                    shutil.copy2("package-lock.json", cwd)
                    subprocess.run(
                        ["npm", "install", "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                        cwd=cwd, check=True,
                    )
                    os.remove(os.path.join(cwd, "package-lock.json"))
                elif os.path.isdir(rel):
                    shutil.copytree(rel, target, dirs_exist_ok=True)
                else:
                    shutil.copy2(rel, target)
        elif keyword == "ENTRYPOINT":
            entrypoint = json.loads(arg)
        elif keyword == "HEALTHCHECK":
            healthcheck = json.loads(arg[arg.index("CMD") + 3:])
    if entrypoint is None or healthcheck is None:
        sys.exit(f"{dockerfile}: the final stage needs an ENTRYPOINT and a HEALTHCHECK CMD in JSON form")

    def relocate(args):  # image paths to the temp root, port 8000 to a free one, loopback only
        return [local(a) if a.startswith("/app/") else a.replace("8000", port).replace("0.0.0.0", "127.0.0.1") for a in args]

    run_env = dict(os.environ, **env)
    for v in env.values():
        if v.startswith(root):
            os.makedirs(v, exist_ok=True)
    server = subprocess.Popen(relocate(entrypoint) + [model] + flags, env=run_env, cwd=local(workdir))
    try:
        deadline = time.time() + 120
        while subprocess.run(relocate(healthcheck), env=run_env).returncode != 0:
            if server.poll() is not None or time.time() > deadline:
                sys.exit(f"{dockerfile}: the server never passed its HEALTHCHECK (exit {server.poll()})")
            time.sleep(1)
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", body, {"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as res:
            answer = json.load(res)
        if not answer["choices"][0]["message"]["content"]:
            sys.exit(f"{dockerfile}: empty completion: {answer}")
        server.send_signal(signal.SIGTERM)
        if server.wait(timeout=15) != 0:
            sys.exit(f"{dockerfile}: the server exited with {server.returncode} on SIGTERM")
        print(f"{dockerfile}: the final stage's files serve {os.path.basename(model)}; HEALTHCHECK passes")
    finally:
        if server.poll() is None:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
