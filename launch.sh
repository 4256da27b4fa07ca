#!/usr/bin/env bash
# Run any `dept` command on every rank, under the deepspeed launcher (default) or torchrun. Clusters: docs/clusters.md.
#
#   ./launch.sh run recipes/quickstart.yaml              # all local GPUs; on a machine without GPUs, 2 CPU ranks
#   NPROC=4 ./launch.sh train --model ... --train_file ...    # choose the number of local ranks
#   HOSTFILE=hosts ./launch.sh run recipes/llama2_7b.yaml     # multi-node over ssh (pdsh); lines `host slots=N`;
#       run it on the first host; every host must see this working directory and this python (shared filesystem)
#   HOSTFILE=hosts NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./launch.sh run ...   # multi-node without ssh: start the
#       same command on every node with its own NODE_RANK (0 .. nodes-1); MASTER_ADDR is node 0's address
#   LAUNCHER=torchrun NNODES=2 NODE_RANK=0 MASTER_ADDR=... ./launch.sh run ...   # torchrun, one call per node
#
# Environment: NPROC (ranks per node), MASTER_PORT (default 29500), MASTER_ADDR (default: 127.0.0.1, or the
# hostfile's first host), HOSTFILE, NODE_RANK, NNODES, LAUNCHER (deepspeed | torchrun), OMP_NUM_THREADS (CPU
# ranks: cores / ranks by default), PYTHON (the interpreter with the package; default: the first of python3,
# python, ./.venv/bin/python beside this script that can import pipeline.cli), SSH_TIMEOUT (seconds, default 10:
# the reachability check of every host), PDSH_SSH_ARGS_APPEND (extra ssh options, e.g. `-F cluster_ssh_config`,
# used by that check and by pdsh), EXPORT_ENV (names of further variables to pass to remote ranks).
#
# Over ssh, the ranks do not inherit this shell's environment: the deepspeed launcher passes them the variables
# it exports by itself (MLFLOW_*, PYTHON*) and those listed in its env file. This script writes a run-specific env
# file with PATH, DS_ACCELERATOR, OMP_NUM_THREADS, MKL_NUM_THREADS, TOKENIZERS_PARALLELISM, XDG_CACHE_HOME and every
# DEPT_*, HF_*, TRANSFORMERS_*, TORCH_*, GLOO_*, NCCL_*, MLFLOW_* variable (plus EXPORT_ENV), followed by the
# user's own ~/.deepspeed_env and ./.deepspeed_env (or $DS_ENV_FILE), which it reads but never writes; the file
# is unlinked before the launcher starts (the launcher reads it through an inherited descriptor).
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }  # one word for a POSIX remote shell

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAUNCHER=${LAUNCHER:-deepspeed}
MASTER_PORT=${MASTER_PORT:-29500}
SSH_TIMEOUT=${SSH_TIMEOUT:-10}

if [[ $# -eq 0 ]]; then
  echo "usage: ./launch.sh COMMAND [ARGS...]   (COMMAND: run, train, evaluate, predict, bench; see dept --help)" >&2
  exit 2
fi
case "$LAUNCHER" in
  deepspeed) launcher_module=deepspeed ;;
  torchrun) launcher_module=torch ;;
  *) die "LAUNCHER must be deepspeed or torchrun, got $LAUNCHER" ;;
esac
[[ $MASTER_PORT =~ ^[0-9]+$ ]] && (( MASTER_PORT > 0 && MASTER_PORT < 65536 )) ||
  die "MASTER_PORT must be a port number (1-65535), got $MASTER_PORT"
[[ $SSH_TIMEOUT =~ ^[0-9]+$ ]] && (( SSH_TIMEOUT > 0 )) || die "SSH_TIMEOUT must be a whole number of seconds, got $SSH_TIMEOUT"

# --- the python that has the package (an installed wheel, an activated venv, or the checkout's .venv) ---------
has_package() {
  "$1" -c "import importlib.util as u, sys; sys.exit(u.find_spec('pipeline.cli') is None or u.find_spec('$launcher_module') is None)" \
    >/dev/null 2>&1
}
PY=""
if [[ -n "${PYTHON:-}" ]]; then
  candidate=$(command -v -- "$PYTHON" 2>/dev/null) || die "PYTHON=$PYTHON is not an executable"
  [[ $candidate == /* ]] || candidate="$PWD/$candidate"
  has_package "$candidate" || die "PYTHON=$PYTHON cannot import pipeline.cli and $launcher_module: install the package into it"
  PY=$candidate
else
  for name in python3 python "$HERE/.venv/bin/python"; do
    candidate=$(command -v -- "$name" 2>/dev/null) || continue
    [[ $candidate == /* ]] || candidate="$PWD/$candidate"
    if has_package "$candidate"; then PY=$candidate; break; fi
  done
  [[ -n $PY ]] || die "no python with the dept-pipeline package and $launcher_module found (tried python3, python, $HERE/.venv/bin/python): activate its environment or set PYTHON=/path/to/python"
fi

# --- the hostfile: checked here, line by line, before anything starts anywhere ----------------------------------
HOSTS=()
SLOTS=()
LINENOS=()
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE $HOSTFILE does not exist"
  lineno=0
  while IFS= read -r line || [[ -n $line ]]; do
    lineno=$((lineno + 1))
    entry=${line%%#*}
    entry="${entry#"${entry%%[![:space:]]*}"}"
    entry="${entry%"${entry##*[![:space:]]}"}"
    [[ -z $entry ]] && continue
    [[ $entry =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+)$ ]] ||
      die "HOSTFILE $HOSTFILE line $lineno does not parse: '$line' (expected 'HOST slots=N')"
    host=${BASH_REMATCH[1]}
    slots=$((10#${BASH_REMATCH[2]}))
    (( slots > 0 )) || die "HOSTFILE $HOSTFILE line $lineno: slots must be at least 1 ('$line')"
    for seen in "${HOSTS[@]}"; do
      [[ $seen != "$host" ]] || die "HOSTFILE $HOSTFILE line $lineno: host $host is listed twice"
    done
    HOSTS+=("$host")
    SLOTS+=("$slots")
    LINENOS+=("$lineno")
  done < "$HOSTFILE"
  (( ${#HOSTS[@]} > 0 )) || die "HOSTFILE $HOSTFILE lists no hosts (lines 'HOST slots=N')"
  if [[ -n "${NODE_RANK:-}" ]]; then
    [[ $NODE_RANK =~ ^[0-9]+$ ]] && (( 10#$NODE_RANK < ${#HOSTS[@]} )) ||
      die "NODE_RANK $NODE_RANK is outside the hostfile: $HOSTFILE lists ${#HOSTS[@]} node(s), NODE_RANK 0..$(( ${#HOSTS[@]} - 1 ))"
    NODE_RANK=$((10#$NODE_RANK))
  fi
  if [[ -z "${MASTER_ADDR:-}" ]]; then
    getent ahosts "${HOSTS[0]}" >/dev/null 2>&1 ||
      die "MASTER_ADDR is not set and the hostfile's first host ${HOSTS[0]} does not resolve to an address (an ssh alias?): set MASTER_ADDR to its address"
    MASTER_ADDR=${HOSTS[0]}
  fi
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}

# --- ranks per node and threads per rank ----------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  # No GPU: DeepSpeed's CPU accelerator, gloo backend. The launcher does not limit threads per rank.
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  NPROC=${NPROC:-2}
  [[ $NPROC =~ ^[0-9]+$ ]] && (( NPROC > 0 )) || die "NPROC must be a positive number of ranks, got $NPROC"
  local_ranks=$NPROC
  if (( ${#HOSTS[@]} > 0 )) && [[ $LAUNCHER == deepspeed ]]; then
    local_ranks=${SLOTS[${NODE_RANK:-0}]}
  fi
  cores=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / local_ranks > 0 ? cores / local_ranks : 1 ))}
fi
[[ $NPROC =~ ^[0-9]+$ ]] && (( NPROC > 0 )) || die "NPROC must be a positive number of ranks, got $NPROC"

# --- over ssh: every host answers, sees this directory and this python; remote ranks get the environment -------
check_hosts() {
  command -v pdsh >/dev/null 2>&1 ||
    die "pdsh not found: multi-node over ssh uses it (Debian: apt-get install pdsh); or start each node yourself with NODE_RANK (docs/clusters.md)"
  local -a ssh_extra=()
  read -r -a ssh_extra <<< "${PDSH_SSH_ARGS_APPEND:-}"
  local dir i remote
  dir=$(mktemp -d "${TMPDIR:-/tmp}/dept-launch-check.XXXXXX")
  remote="cd $(quote "$PWD") && test -x $(quote "$PY") || exit 97"
  for i in "${!HOSTS[@]}"; do
    ( rc=0
      timeout -k 2 $((SSH_TIMEOUT + 5)) ssh "${ssh_extra[@]}" -n -o BatchMode=yes -o ConnectTimeout="$SSH_TIMEOUT" \
        "${HOSTS[$i]}" "$remote" >/dev/null 2>"$dir/$i.err" || rc=$?
      echo "$rc" > "$dir/$i.rc" ) &
  done
  wait
  local failed="" reason="" rc
  for i in "${!HOSTS[@]}"; do
    rc=$(cat "$dir/$i.rc" 2>/dev/null || echo 255)
    [[ $rc == 0 ]] && continue
    if [[ -z $failed ]]; then
      if [[ $rc == 97 ]]; then
        reason="host ${HOSTS[$i]} (HOSTFILE line ${LINENOS[$i]}) cannot see the working directory $PWD or the python $PY: every rank runs in the launching directory with the same python, so both must be on a filesystem all nodes share"
      else
        local why
        why=$(tr -d '\r' < "$dir/$i.err" | grep -v '^[[:space:]]*$' | tail -n 1 || true)
        [[ $rc == 124 || $rc == 137 ]] && why="no answer within $((SSH_TIMEOUT + 5)) s"
        reason="host ${HOSTS[$i]} (HOSTFILE line ${LINENOS[$i]}) does not answer ssh within ${SSH_TIMEOUT} s: ${why:-ssh exited $rc}; check passwordless ssh to it (ssh -o BatchMode=yes ${HOSTS[$i]} true)"
      fi
      failed=${HOSTS[$i]}
    else
      failed="$failed ${HOSTS[$i]}"
    fi
  done
  rm -rf "$dir"
  if [[ -n $failed ]]; then
    local n
    n=$(wc -w <<< "$failed")
    (( n > 1 )) && reason="$reason (and $((n - 1)) more host(s): ${failed#* })"
    die "$reason; nothing was started"
  fi
}

write_env_file() {  # on fd 9, already unlinked; DS_ENV_FILE points the launcher at it
  local file name value user_file dir done_files=""
  file=$(mktemp "${TMPDIR:-/tmp}/dept-launch-env.XXXXXX")
  local -a extra=()
  read -r -a extra <<< "${EXPORT_ENV:-}"
  for name in $(compgen -e | LC_ALL=C sort); do
    case "$name" in
      DEPT_*|HF_*|TRANSFORMERS_*|TORCH_*|GLOO_*|NCCL_*|MLFLOW_*|DS_ACCELERATOR|OMP_NUM_THREADS|MKL_NUM_THREADS) ;;
      PATH|TOKENIZERS_PARALLELISM|XDG_CACHE_HOME) ;;
      *) [[ " ${extra[*]} " == *" $name "* ]] || continue ;;
    esac
    value=${!name}
    if [[ $value == *[\$\`\"\\]* || $value == *$'\n'* ]]; then
      rm -f "$file"
      die "$name contains \$, \`, \", \\ or a newline, which the deepspeed launcher cannot pass to remote ranks: change it or set it in each node's environment"
    fi
    printf '%s=%s\n' "$name" "$value" >> "$file"
  done
  # the user's own env files still apply, after ours (DeepSpeed reads ~ then the working directory; later wins)
  user_file=${DS_ENV_FILE:-.deepspeed_env}
  for dir in "$HOME" "$PWD"; do
    [[ $user_file == /* ]] && name=$user_file || name="$dir/$user_file"
    [[ -f $name && " $done_files " != *" $name "* ]] || continue
    grep -v '^[[:space:]]*$' "$name" >> "$file" || true
    done_files="$done_files $name"
  done
  exec 9<"$file"
  rm -f "$file"
  export DS_ENV_FILE=/dev/fd/9
}

# A SIGTERM or SIGINT to this script (a scheduler's preemption, `kill`, Ctrl-C) must reach every rank, which then
# stops at a step boundary with a checkpoint (pipeline/interrupts.py). DeepSpeed's per-node launcher (launch.py)
# forwards both to its ranks, but the runner above it does not for ranks on this node: it would die alone and leave
# them training. So the runner runs as a child here, a signal to this script goes to the launcher under it, and
# the script exits as the ranks do (143 for SIGTERM, 130 for SIGINT) once they are gone. #21
run_forwarding_signals() {
  "$@" &
  local runner=$! got=0 status
  trap 'got=143; pkill -TERM -P "$runner" || true' TERM
  trap 'got=130; pkill -TERM -P "$runner" || true' INT
  while :; do
    status=0
    wait "$runner" || status=$?
    kill -0 "$runner" 2>/dev/null || break
  done
  trap - TERM INT
  (( got )) && exit "$got"
  exit "$status"
}

case "$LAUNCHER" in
  deepspeed)
    if (( ${#HOSTS[@]} > 0 )); then
      if [[ -n "${NODE_RANK:-}" ]]; then
        run_forwarding_signals "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
          --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module pipeline.cli "$@"
      fi
      if (( ${#HOSTS[@]} > 1 )); then  # one host: the launcher runs it here, without ssh
        check_hosts
        write_env_file
      fi
      exec "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_ssh_check --master_addr "$MASTER_ADDR" \
        --master_port "$MASTER_PORT" --module pipeline.cli "$@"
    fi
    run_forwarding_signals "$PY" -m deepspeed.launcher.runner --num_accelerators "$NPROC" --master_port "$MASTER_PORT" \
      --module pipeline.cli "$@"
    ;;
  torchrun)
    exec "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m pipeline.cli "$@"
    ;;
esac
