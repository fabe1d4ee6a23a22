out=$1; shift
: > $out
for i in 1 2 3 4 5; do for b in "$@"; do
  echo "== $b llama" >> $out; $b --threads=1 --passes=3 --kv_layout=head 2>&1 | grep -E 'attention \(' >> $out
done; done
