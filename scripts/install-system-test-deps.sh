#!/usr/bin/env bash
# System tools the tests marked `system` use (tests/lanes.py names them):
#   espeak-ng, sox           real speech clips
#   java (default-jre-headless): pycocoevalcap's PTBTokenizer, the reference the caption
#                            tokenization is checked against
#   node (nodejs), chromium  the web page's modules run under node; the page itself in
#                            headless Chromium against the server
#   (Linux) pulseaudio, pulseaudio-utils, libasound2-plugins, libportaudio2, tmux:
#                            the live-mode tests run the app against a private PulseAudio
#                            server with null sinks (PortAudio reaches it through ALSA's
#                            "pulse" plugin) and drive the terminal UI under tmux
#   libopus0 (macOS: brew install opus): the Opus library a third-party Moshi client
#                            (fujielab-moshi-client, through opuslib) loads in the server tests
#
# Installed with apt where available, missing and run as root. Otherwise this says what is
# missing and how to install it, and carries on: the tests needing a missing tool skip,
# saying so. With CI set (.ci/run sets it) every tool must be there in the end, or this fails.
set -euo pipefail

missing() {
    need=()
    command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
    command -v sox >/dev/null 2>&1 || need+=(sox)
    command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
    command -v node >/dev/null 2>&1 || need+=(nodejs)
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    if [ "$(uname -s)" = Linux ]; then
        command -v pulseaudio >/dev/null 2>&1 || need+=(pulseaudio)
        command -v parec >/dev/null 2>&1 || need+=(pulseaudio-utils)
        command -v tmux >/dev/null 2>&1 || need+=(tmux)
        if command -v dpkg >/dev/null 2>&1; then
            for pkg in libportaudio2 libasound2-plugins libopus0; do
                dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
            done
        fi
    fi
}

in_ci() {
    case "$(printf %s "${CI:-}" | tr '[:upper:]' '[:lower:]')" in
        "" | 0 | false | no) return 1 ;;
        *) return 0 ;;
    esac
}

missing
[ ${#need[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing test tools: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
        || { apt-get update -qq >/dev/null \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; } \
        || echo "apt-get could not install: ${need[*]}" >&2
    missing
    [ ${#need[@]} -eq 0 ] && exit 0
fi

if command -v apt-get >/dev/null 2>&1; then
    how="$([ "$(id -u)" = 0 ] || echo "sudo ")apt-get install ${need[*]}"
elif command -v brew >/dev/null 2>&1; then
    how="brew install ${need[*]}"
else
    how="your package manager"
fi
echo "missing test tools: ${need[*]}; install them with: $how" >&2
if in_ci; then
    echo "CI is set: the system tests may not skip, so this fails the run" >&2
    exit 1
fi
echo "(carrying on: the tests that need them will be skipped)" >&2
