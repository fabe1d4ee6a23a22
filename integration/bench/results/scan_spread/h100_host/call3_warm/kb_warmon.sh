#!/bin/sh
MEMPIPE_SCAN_WARM=1 exec "$(dirname "$0")/kb_warm" "$@"
