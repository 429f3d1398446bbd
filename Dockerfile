# kernel-service: persistent IPython kernels behind HTTP.
#   docker build -t kernel-service .
#   docker run --rm -p 127.0.0.1:8000:8000 -e KERNEL_SERVICE_API_KEY=... kernel-service
#
# As a non-root user the per-kernel bubblewrap sandbox cannot give each kernel a uid of its
# own, so this image runs kernels unsandboxed (KERNEL_SERVICE_SANDBOX=none) and the
# container is the isolation boundary: one container per tenant. For the per-kernel
# sandbox inside the container, run it as root with the rights bubblewrap needs:
#   docker run --rm --user root --cap-add SYS_ADMIN --security-opt seccomp=unconfined \
#     --security-opt apparmor=unconfined -e KERNEL_SERVICE_SANDBOX=bubblewrap \
#     -v /run/kernel-service:/run/kernel-service ...
# (the host's kernel uid claims, shared by every sandboxed container: docs/security.md, "Uids").
FROM python:3.11-slim-bookworm

# A CJK font so plots can label in Chinese; tini reaps what kernels leave behind;
# bubblewrap and e2fsprogs for the sandbox when run as root; HAProxy, the front of a
# cluster of cells (`kernel-service cluster`, or a front pod: docs/scaling.md); R and
# IRkernel, the kernel of R sessions (not on PyPI); a Java runtime for JJava.
RUN apt-get update \
 && apt-get install -y --no-install-recommends fonts-wqy-microhei fontconfig tini \
      bubblewrap e2fsprogs haproxy r-base-core r-cran-irkernel \
      openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 kernel
WORKDIR /app
COPY pyproject.toml README.md ./
COPY kernel_service ./kernel_service
COPY client ./client
# the languages extra: Bash's kernel, Deno (the binary comes in its wheel) for
# JavaScript and TypeScript, and JJava (its jars in its wheel) for Java
RUN pip install --no-cache-dir ./client '.[languages]' && rm -rf /root/.cache

USER kernel
WORKDIR /home/kernel
ENV KERNEL_SERVICE_HOST=0.0.0.0 \
    KERNEL_SERVICE_PORT=8000 \
    KERNEL_SERVICE_CONNECTION_DIR=/home/kernel/connection \
    KERNEL_SERVICE_WORK_DIR=/home/kernel/workspaces \
    KERNEL_SERVICE_STATE_DIR=/home/kernel/state \
    KERNEL_SERVICE_SANDBOX=none
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
ENTRYPOINT ["tini", "--"]
CMD ["kernel-service", "serve"]
