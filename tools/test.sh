#!/usr/bin/env bash
# The test command: every kernel against its CPU twin on a real Vulkan device,
# lavapipe (Mesa's software Vulkan) when the machine has no GPU.
#
#   tools/test.sh [cargo test args]    (none: the whole workspace, C API included)
#
# Installs lavapipe with apt when no Vulkan driver is present (needs root;
# otherwise prints the command to run). WGPU_BACKEND defaults to vulkan.
set -euo pipefail
cd "$(dirname "$0")/.."

have_vulkan_icd() {
  ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json /usr/local/share/vulkan/icd.d/*.json \
    >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'
}

if [ -z "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ] && ! have_vulkan_icd; then
  cmd='apt-get update && apt-get install -y mesa-vulkan-drivers libvulkan1'
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tools/test.sh: no Vulkan driver found; installing lavapipe: $cmd" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1) >&2
  else
    echo "tools/test.sh: no Vulkan driver found. Install lavapipe first (as root): $cmd" >&2
    exit 1
  fi
fi

export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
# Mesa's window-system code complains without it; compute needs no display.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  XDG_RUNTIME_DIR="$(mktemp -d)"
  export XDG_RUNTIME_DIR
fi

if [ $# -eq 0 ]; then
  cargo test --workspace
else
  cargo test "$@"
fi
