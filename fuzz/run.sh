#!/bin/sh
# Fuzz the header parser and the readers. Extra arguments go to libFuzzer, e.g. -max_total_time=600.
set -eu
cd "$(dirname "$0")/.."
python fuzz/make_seeds.py fuzz/seeds
mkdir -p fuzz/corpus fuzz/findings
exec python fuzz/fuzz_header.py fuzz/corpus fuzz/seeds -dict=fuzz/header.dict -max_len=65536 \
    -timeout=10 -rss_limit_mb=4096 -artifact_prefix=fuzz/findings/ -print_final_stats=1 "$@"
