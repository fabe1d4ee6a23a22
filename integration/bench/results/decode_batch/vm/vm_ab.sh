cd /work/tmp
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --layers=64 --kv_layout=head"
{ date; uptime; grep -m1 "model name" /proc/cpuinfo; } > vm_ab.txt
r() { echo "== $1" >> vm_ab.txt; shift; python3 ab4.py ./kb_A ./kb_B 5 "$@" >> vm_ab.txt 2>&1; }
r "llama bf16 p16 head t2" --threads=2 --kv_layout=head
r "llama bf16 p16 head t1" --threads=1 --kv_layout=head --layers=4
r "llama bf16 p16 token t2" --threads=2 --kv_layout=token
r "smollm2 fp32 p32 head t2" --threads=2 $S --dtype=fp32
r "smollm2 fp32 p32 head t1" --threads=1 $S --dtype=fp32
r "smollm2 bf16 p32 head t2" --threads=2 $S --dtype=bf16
r "smollm2 bf16 p32 head t1" --threads=1 $S --dtype=bf16
{ date; uptime; } >> vm_ab.txt
