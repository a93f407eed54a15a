# corral: two commands for a fresh Debian bookworm machine (as root):
#   make run    installs what it needs, starts the manager and boots a real demo VM
#   make test   installs what it needs and runs the whole test suite
# Other targets: lint, bench, deps, guests, clean.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTEST_ARGS ?=

# Debian packages corral and its tests use at run time. The guest builder (guests/build.py)
# installs the few it needs on top of these (debootstrap, busybox-static, ...) by itself.
# rabbitmq-server: the message API's tests start their own broker node from it
# (tests/e2e/broker.py); openssl makes the test certificates (broker TLS, API TLS).
# chromium is the real browser the web pages' tests drive with Playwright (no browser download).
# npm vendors the web pages' front-end packages (scripts/vendor-web.sh): Debian's npm is installed
# only where no npm exists, on its own (it conflicts with a nodejs that bundles npm, as
# NodeSource's does, which would fail the whole install).
# The Kubernetes tests (tests/k8s): golang-go, rsync, dpkg-dev and Debian's reflect2 1.0.2 build
# the cluster binaries (kube/build.py); etcd-server, containerd, runc and the CNI plugins run the
# node; gcc (static pause binary), umoci and skopeo make the images (image/build.py).
APT_PACKAGES := qemu-system-x86 qemu-utils qemu-block-extra swtpm swtpm-tools ovmf \
	mtools dosfstools genisoimage cpio zstd busybox-static debootstrap \
	python3-venv systemd iproute2 util-linux rabbitmq-server openssl chromium \
	golang-go rsync dpkg-dev golang-github-modern-go-reflect2-dev etcd-server containerd runc \
	containernetworking-plugins umoci skopeo gcc libc6-dev
APT_COMMANDS := qemu-system-x86_64 qemu-img swtpm swtpm_setup mcopy mkfs.vfat genisoimage \
	cpio zstd busybox debootstrap systemd-analyze ip unshare rabbitmq-server epmd openssl \
	chromium go rsync dpkg-source etcd containerd ctr runc umoci skopeo gcc

.PHONY: help run stop test lint bench deps deps-system deps-python guests web kube image clean

help:
	@echo "make run    - start corral serve and a demo VM (installs qemu & co. if missing)"
	@echo "make stop   - power the demo VM down and stop the daemon"
	@echo "make test   - run the whole test suite (unit + integration + e2e)"
	@echo "make lint   - ruff, mypy --strict, import-linter"
	@echo "make bench  - corral vs raw qemu vs libvirt, side by side (docs/benchmarks.md)"
	@echo "make web    - vendor the web pages' front-end packages from npm (make run/test do it)"
	@echo "make kube   - build the test cluster's Kubernetes binaries (cached, ~8 min cold)"
	@echo "make image  - build the corral runner image localhost/corral:dev (cached)"

deps: deps-system deps-python

deps-system:
	@missing=""; \
	for c in $(APT_COMMANDS); do command -v $$c >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin:/sbin" command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || [ -e /usr/share/OVMF/OVMF_CODE.fd ] || missing="$$missing ovmf"; \
	ls /usr/lib/*/qemu/block-curl.so >/dev/null 2>&1 || missing="$$missing qemu-block-extra"; \
	[ -e /usr/lib/cni/bridge ] || missing="$$missing containernetworking-plugins"; \
	[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || missing="$$missing reflect2"; \
	python3 -c 'import ensurepip' 2>/dev/null || missing="$$missing venv"; \
	if [ -n "$$missing" ]; then \
		echo "[deps] missing:$$missing -> apt-get install"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi
	@command -v npm >/dev/null 2>&1 || { echo "[deps] missing: npm -> apt-get install npm"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends npm; }
	@# qemu drops root to this user after opening its files (host policy runAs; docs/security.md)
	@id corral-qemu >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		PATH="$$PATH:/usr/sbin:/sbin" useradd --system --no-create-home --home-dir /nonexistent \
			--shell /usr/sbin/nologin corral-qemu

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

deps-python: $(VENV)/.installed

guests: deps
	$(PY) guests/build.py all

# the web pages' front-end packages, from the npm registry (pinned + hashed), served locally
WEB_VENDOR := src/corral/web/vendor/.vendored
$(WEB_VENDOR): scripts/vendor-web.sh
	scripts/vendor-web.sh

web: deps-system $(WEB_VENDOR)

run: deps web
	$(PY) examples/demo.py

stop: deps-python
	$(PY) examples/demo.py stop

# The Kubernetes binaries from Debian's kubernetes source, cached in
# $${CORRAL_KUBE_CACHE:-~/.cache/corral/kube} and rebuilt only when missing.
kube: deps
	$(PY) kube/build.py

# The runner image (docker-archive, tag localhost/corral:dev), cached by a hash of the sources.
image: deps
	$(PY) image/build.py

test: deps web lint kube image
	$(PY) -m pytest $(PYTEST_ARGS)

lint: deps-python
	$(VENV)/bin/ruff check src tests guests examples bench kube image
	$(VENV)/bin/ruff format --check src tests guests examples bench kube image
	$(VENV)/bin/mypy src
	$(VENV)/bin/lint-imports

# libvirt for the side-by-side benchmark only (bench/compare.py starts its own libvirtd and
# virtlogd on a private socket); the other benchmarks: $(PY) -m bench runner|manager|api|faults
BENCH_APT_PACKAGES := libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients

bench: deps
	@command -v virsh >/dev/null 2>&1 && [ -x /usr/sbin/libvirtd ] && [ -x /usr/sbin/virtlogd ] || { \
		echo "[bench] installing libvirt:$(BENCH_APT_PACKAGES)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $(BENCH_APT_PACKAGES); }
	$(PY) -m bench compare

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
