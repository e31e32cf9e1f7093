# Source in a GPU script: `run NAME LIMIT CMD...` runs one part under `timeout LIMIT` (seconds; 0 skips it), its full
# log in $OUT/NAME.txt, and prints its exit status and last TAIL lines (default 4; per-layer attention lines dropped).
run() { local name=$1 limit=$2; shift 2; [ "$limit" -gt 0 ] || { echo "=== $name: skipped"; return; }
        echo "=== $name"; timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
        echo "rc=$? ($name)"; grep -v "^\[nanochat\] attention: layer" "$OUT/$name.txt" | tail -n "${TAIL:-4}" | cut -c1-1200; }
