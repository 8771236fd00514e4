"""The only home of protocol and metric key strings (Flower records, node config, metrics)."""

# Records inside a Message's RecordDict.
ADAPTER = "adapter"  # ArrayRecord: a (possibly partial) adapter state
BASE = "base"  # ArrayRecord: factored base merges the client has not applied yet
COMPRESSED = "compressed"  # ArrayRecord: an encoded uplink (ComPEFT)
DOWNLINK = "downlink"  # ArrayRecord: a compressed start adapter (fedlora.federation.downlink), packed
CONTROL = "control"  # ArrayRecord: the server's control variate c at the client's rank (compression=scafcom)
SECURE = "secure"  # ArrayRecord: the vector a client puts into secure aggregation (fedlora.core.secure)
CLIP_REFERENCE = "clip-reference"  # ArrayRecord: the global adapter a client clips its change against (DP + secure)
CONFIG = "config"  # ConfigRecord: per-message instructions
METRICS = "metrics"  # MetricRecord: client replies

# ConfigRecord / MetricRecord keys.
ACTION = "action"
HELLO = "hello"
SERVER_ROUND = "server-round"
RANK = "rank"
INIT_SEED = "init-seed"
TRAIN_LORA_A = "train-lora-a"
TRAIN_LORA_B = "train-lora-b"
SEND_LORA_A = "send-lora-a"
FRESH = "fresh"
BASE_VERSION = "base-version"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
TRAIN_SECONDS = "train-seconds"
LABEL_NAMES = "label-names"  # the run's class names, in the server's numbering (hello)
SECURE_RANK = "secure-rank"  # the layout rank of a secure round's vector (absent: the reply carries tensors)
SECURE_SEED = "secure-seed"  # seeds the client's stochastic quantization in a secure round
SECURE_WEIGHT = "secure-weight"  # the weight a client's vector enters the secure sum with (absent: its examples)
DP_CLIP = "dp-clip"  # client-level DP under secure aggregation: the L2 norm each client clips its change to
DOWNLINK_BASE = "downlink-base"  # the round of the client's copy a compressed downlink is relative to (0: reference)
DOWNLINK_CRC = "downlink-crc"  # CRC-32 of that copy
DOWNLINK_CONTROL = "downlink-control"  # the compressed copy holds the control variate c too (compression=scafcom)
# an evaluation reply's metrics: "eval/test_accuracy", ... (and NUM_EXAMPLES: how many examples it evaluated on)
EVAL_PREFIX = "eval/"
PERSONAL = "personal"  # ClientPlan.personal: the client's B and head are its own ("kept" or "start")
# ClientPlan.prune (HetLoRA's rank self-pruning): present only when the plan asks for it
PRUNE_GAMMA = "prune-gamma"
PRUNE_WEIGHT = "prune-weight"
PRUNE_MIN_RANK = "prune-min-rank"
SAVE_OWN = "save-own"  # the last round's evaluation of a personalized strategy: the client saves the model it scores
SAVED_TO = "saved-to"  # an evaluation reply's config: where the client saved that model (its own machine's path)
RESUME_ROUND = "resume-round"  # the checkpoint round a resumed run continues from (0: a fresh run)
CLIENT_CONFIG = "fedlora-config"  # run_config key holding the JSON of the resolved config

# Node-config keys a SuperNode may set (deployment).
NODE_RANK = "rank"
NODE_DATA = "data-path"
NODE_STATE_DIR = "state-dir"  # where the node keeps state that must survive a kill (ComPEFT residual)
NODE_WORKER = "node-worker"  # false: answer every message in the flwr-clientapp process (no node worker)
