# A local stand-in for the official redis image, for machines that cannot pull it: Debian's
# redis-server on the local base (make base-image), run as the official image's uid 999 with
# its /data volume owned by it (compose/offline.yml). Built with the host's network (apt reaches
# the Debian mirror over plain HTTP; packages are signed):
#   docker build --network host -f compose/redis.Dockerfile --build-arg PYTHON_IMAGE=cifar10/python:3.11-bookworm \
#       -t cifar10/redis:7-bookworm compose
ARG PYTHON_IMAGE=cifar10/python:3.11-bookworm
FROM ${PYTHON_IMAGE}
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown 999:1000 /data
VOLUME /data
USER 999:1000
CMD ["redis-server"]
