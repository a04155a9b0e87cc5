#!/usr/bin/env bash
# System tools the tests use. Installed with apt where available and missing; elsewhere the
# user installs them (brew install espeak-ng sox).
#   espeak-ng, sox           real speech clips
#   (Linux) pulseaudio, pulseaudio-utils, libasound2-plugins, libportaudio2, tmux:
#                            the live-mode tests run the app against a private PulseAudio
#                            server with null sinks (PortAudio reaches it through ALSA's
#                            "pulse" plugin) and drive the terminal UI under tmux
set -euo pipefail
need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need+=(sox)
if [ "$(uname -s)" = Linux ]; then
    command -v pulseaudio >/dev/null 2>&1 || need+=(pulseaudio)
    command -v parec >/dev/null 2>&1 || need+=(pulseaudio-utils)
    command -v tmux >/dev/null 2>&1 || need+=(tmux)
    if command -v dpkg >/dev/null 2>&1; then
        for pkg in libportaudio2 libasound2-plugins; do
            dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
        done
    fi
fi
[ ${#need[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing test tools: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
        || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }
else
    echo "missing test tools: ${need[*]} (install them with your package manager)" >&2
    exit 1
fi
