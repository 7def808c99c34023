#!/usr/bin/env bash
# Launch a ddspo_jax command on GKE TPU slices as a JobSet (one pod per TPU host, one JAX process per pod).
#
#   launch/gke_tpu.sh --tpu-type v5e --topology 4x4 --image IMAGE --output gs://B/runs/x \
#       --records gs://B/records/pick -- train --config configs/sd15.py --config.train.steps=2000
#
# --dry-run prints the manifest only (no kubectl, no cluster). See --help and launch/README.md.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TABLE="${DDSPO_TPU_TABLE:-$HERE/tpu_topologies.tsv}"
SETTINGS="${DDSPO_TPU_SETTINGS:-$HERE/tpu_settings.tsv}"
PROG="$(basename "$0")"

CLUSTER="" PROJECT="" ZONE="" CONTEXT="" NAMESPACE="default"
TPU_TYPE="" TOPOLOGY="" MACHINE_TYPE="" NUM_SLICES=1
IMAGE="" NAME="" RECORDS="" OUTPUT="" SERVICE_ACCOUNT=""
MAX_RESTARTS=10 GCSFUSE=1 OUTPUT_FUSE=0 SPOT=0 DRY_RUN=0 CHIP_SETTINGS=1
EXTRA_ENV=()
CMD=()
COORD_PORT=8476  # JAX's default coordinator port on Cloud TPU

usage() {
  cat <<EOF
Usage: $PROG [options] -- COMMAND [ARGS...]

Renders a Kubernetes JobSet (jobset.x-k8s.io/v1alpha2) that runs COMMAND on every host of
--num-slices TPU slices of --tpu-type/--topology, applies it with 'kubectl apply -f -' and prints
how to follow the logs. COMMAND is a ddspo_jax command with its config and overrides, e.g.
  -- train --config configs/sd15.py --config.train.beta=8000     (short for python -m ddspo_jax.train ...)
  -- python -m ddspo_jax.train --config configs/sd15.py
--config.output_dir=<--output> and --config.data.records=<--records> are appended to it.

Cluster (default: the current kube context):
  --cluster NAME         GKE cluster; fetch its credentials with gcloud before applying
  --project ID           Google Cloud project of --cluster
  --zone ZONE            zone or region (gcloud --location) of --cluster
  --context CTX          kube context to use instead of the current one
  --namespace NS         Kubernetes namespace (default: $NAMESPACE)

TPU shape (valid pairs: launch/tpu_topologies.tsv; an unknown pair is rejected with the list):
  --tpu-type TYPE        v4, v5e (alias v5litepod, v5lite), v5p, v6e, or a GKE accelerator label
  --topology SHAPE       e.g. v5e/v6e 2x4, 4x4, 8x8; v4/v5p 2x2x2, 2x4x4
  --machine-type MT      pick the row when one topology has two machine types (v5e/v6e 2x4:
                         default 1 host x 8 chips; ct5lp-hightpu-4t / ct6e-standard-4t: 2 hosts x 4)
  --num-slices N         slices (JobSet replicas; >1 is Multislice over DCN) (default: $NUM_SLICES)
  --no-chip-settings     keep the config's own micro-batch, remat and mesh (default: insert the row of
                         launch/tpu_settings.tsv for the command's --config file and --tpu-type, the
                         settings the TPU compiler found to fit that chip, right after --config, so
                         your own --config.* overrides still win)

Job:
  --image IMAGE          container image built from launch/Dockerfile (ACCELERATOR=tpu)   [required]
  --name NAME            JobSet name, a DNS label of at most 40 characters (default: ddspo-<time>)
  --output gs://B/P      run folder: checkpoints, TensorBoard, samples; appended as
                         --config.output_dir (needed to resume after a restart)             [required]
  --records gs://B/P     preference records folder; appended as --config.data.records
  --no-gcsfuse           pass a gs:// --records through as it is (default: mount its bucket read-only
                         with the GKE Cloud Storage FUSE CSI driver at /gcs/<bucket> and pass that
                         path, since the records loader reads plain files)
  --gcsfuse-output       also mount the --output bucket (read-write) and pass /gcs/<bucket>/... as
                         output_dir (default: pass gs:// as it is; Orbax and TensorBoard write to GCS
                         themselves, and Orbax's commit-by-rename is not atomic on a FUSE mount)
  --service-account KSA  Kubernetes service account (Workload Identity access to the buckets)
  --env KEY=VALUE        extra container environment variable (repeatable)
  --max-restarts N       JobSet failurePolicy.maxRestarts: whole-JobSet restarts after a failed or
                         preempted pod; each restart resumes from the last checkpoint (default: $MAX_RESTARTS)
  --spot                 schedule on Spot TPU nodes (cloud.google.com/gke-spot=true)
  --dry-run              print the manifest and exit; needs neither kubectl nor a cluster
  -h, --help             this help
EOF
}

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }

# --- arguments --------------------------------------------------------------------------------
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  opt=$1
  case $opt in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    --no-gcsfuse) GCSFUSE=0; shift; continue ;;
    --gcsfuse-output) OUTPUT_FUSE=1; shift; continue ;;
    --spot) SPOT=1; shift; continue ;;
    --no-chip-settings) CHIP_SETTINGS=0; shift; continue ;;
    --) shift; CMD=("$@"); break ;;
    --*) (($# >= 2)) || die "$opt needs a value" ;;
    *) die "unexpected argument '$opt' (the command goes after --; see --help)" ;;
  esac
  val=$2
  shift 2
  case $opt in
    --cluster) CLUSTER=$val ;;
    --project) PROJECT=$val ;;
    --zone|--location|--region) ZONE=$val ;;
    --context) CONTEXT=$val ;;
    --namespace) NAMESPACE=$val ;;
    --tpu-type) TPU_TYPE=$val ;;
    --topology) TOPOLOGY=$val ;;
    --machine-type) MACHINE_TYPE=$val ;;
    --num-slices) NUM_SLICES=$val ;;
    --image) IMAGE=$val ;;
    --name) NAME=$val ;;
    --records) RECORDS=$val ;;
    --output) OUTPUT=$val ;;
    --service-account) SERVICE_ACCOUNT=$val ;;
    --env) EXTRA_ENV+=("$val") ;;
    --max-restarts) MAX_RESTARTS=$val ;;
    *) die "unknown option '$opt' (see --help)" ;;
  esac
done

[[ -n $TPU_TYPE ]] || die "--tpu-type is required (see --help)"
[[ -n $TOPOLOGY ]] || die "--topology is required (see --help)"
[[ -n $IMAGE ]] || die "--image is required"
[[ -n $OUTPUT ]] || die "--output is required (checkpoints must outlive the pods to resume)"
((${#CMD[@]})) || die "no command: put it after --, e.g. -- train --config configs/sd15.py"
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$NUM_SLICES'"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be a non-negative integer, got '$MAX_RESTARTS'"
[[ -f $TABLE ]] || die "topology table $TABLE not found"

if [[ -z $NAME ]]; then NAME="ddspo-$(date -u +%m%d-%H%M%S)"; fi
# Pod hostnames are <name>-slice-<i>-<j>; keep them within the 63-character DNS label limit.
[[ $NAME =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] ||
  die "--name '$NAME' must be a DNS label: lowercase letters, digits and '-', starting with a letter, at most 40 characters"

for kv in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv' is not KEY=VALUE"
done

# --- TPU shape from the table -------------------------------------------------------------------
case ${TPU_TYPE,,} in
  v5litepod|v5lite|v5-lite|v5lite-podslice) TPU_TYPE=v5e ;;
  *) TPU_TYPE=${TPU_TYPE,,} ;;
esac

ROWS=()  # rows of the requested type (matched by short name or GKE label)
while IFS=$'\t' read -r t acc topo chips hosts cph mt; do
  [[ -z $t || $t == \#* ]] && continue
  if [[ $t == "$TPU_TYPE" || $acc == "$TPU_TYPE" ]]; then ROWS+=("$t"$'\t'"$acc"$'\t'"$topo"$'\t'"$chips"$'\t'"$hosts"$'\t'"$cph"$'\t'"$mt"); fi
done <"$TABLE"

if ((${#ROWS[@]} == 0)); then
  types=$(awk -F'\t' '!/^#/ && NF { if (!seen[$1]++) printf "%s%s (%s)", (n++ ? ", " : ""), $1, $2 }' "$TABLE")
  die "unknown --tpu-type '$TPU_TYPE'; valid types: $types (aliases: v5litepod, v5lite for v5e)"
fi

MATCH=""
for row in "${ROWS[@]}"; do
  IFS=$'\t' read -r _ _ topo _ _ _ mt <<<"$row"
  if [[ $topo == "$TOPOLOGY" && ( -z $MACHINE_TYPE || $mt == "$MACHINE_TYPE" ) ]]; then MATCH=$row; break; fi
done
if [[ -z $MATCH ]]; then
  valid=""
  for row in "${ROWS[@]}"; do
    IFS=$'\t' read -r _ _ topo chips hosts cph mt <<<"$row"
    valid+=$(printf '\n  %-9s %5s chips  %4s hosts x %s chips  %s' "$topo" "$chips" "$hosts" "$cph" "$mt")
  done
  what="topology '$TOPOLOGY'"
  [[ -n $MACHINE_TYPE ]] && what+=" with machine type '$MACHINE_TYPE'"
  die "unknown $what for $TPU_TYPE; valid topologies for $TPU_TYPE:$valid"
fi
IFS=$'\t' read -r TPU_TYPE ACCELERATOR _ CHIPS HOSTS CHIPS_PER_HOST MACHINE_TYPE <<<"$MATCH"
PROCESSES=$((HOSTS * NUM_SLICES))
if ((NUM_SLICES > 1 && HOSTS == 1)); then
  warn "GKE documents Multislice for multi-host slices only; $TPU_TYPE $TOPOLOGY ($MACHINE_TYPE) is one host per slice"
fi

# --- command ---------------------------------------------------------------------------------------
# "train ..." / "ddspo_jax.train ..." is short for "python -m ddspo_jax.train ...".
if [[ ${CMD[0]} =~ ^(ddspo_jax\.)?([a-z_][a-z0-9_.]*)$ && ${CMD[0]} != python* ]]; then
  CMD=(python -m "ddspo_jax.${BASH_REMATCH[2]}" "${CMD[@]:1}")
fi

# The chip's settings (launch/tpu_settings.tsv) go right after --config FILE, before the user's overrides.
CHIP_NOTE=""
if ((CHIP_SETTINGS)); then
  cfg_at=-1 cfg=""
  for i in "${!CMD[@]}"; do
    case ${CMD[i]} in
      --config) cfg_at=$((i + 1)); cfg=${CMD[i + 1]:-} ;;
      --config=*) cfg_at=$i; cfg=${CMD[i]#--config=} ;;
    esac
  done
  if ((cfg_at >= 0)) && [[ -f $SETTINGS ]]; then
    key=${cfg##*/}
    found=""
    while IFS=$'\t' read -r c t micro remat fsdp peak hbm source; do
      [[ -z $c || $c == \#* ]] && continue
      if [[ $c == "$key" && $t == "$TPU_TYPE" ]]; then found=1; break; fi
    done <"$SETTINGS"
    if [[ -n $found ]]; then
      total=$((CHIPS * NUM_SLICES))
      data=-1
      if ((fsdp < 0 || fsdp >= total)); then fsdp=-1; data=1; fi
      ins=("--config.train.micro_batch_per_device=$micro" "--config.model.remat_policy=$remat"
           "--config.mesh.fsdp=$fsdp" "--config.mesh.data=$data")
      CMD=("${CMD[@]:0:cfg_at+1}" "${ins[@]}" "${CMD[@]:cfg_at+1}")
      CHIP_NOTE="$key on $TPU_TYPE: ${ins[*]} (peak $peak of $hbm GiB per chip; $source)"
      printf '%s: chip settings from %s: %s\n' "$PROG" "${SETTINGS##*/}" "$CHIP_NOTE" >&2
    else
      warn "no row for '$key' on $TPU_TYPE in ${SETTINGS##*/}: the config's own micro-batch, remat and mesh are used (check they fit the chip: benchmarks/tpu_aot.py)"
    fi
  fi
fi

# gs://bucket/path -> /gcs/bucket/path with the bucket mounted by the Cloud Storage FUSE CSI driver.
BUCKETS=() BUCKET_RO=()
to_path() {  # $1: gs:// URL or path; $2: 1 if only read; $3: 1 to mount. Sets PATH_OUT to the path the container uses.
  local url=$1 ro=$2 mount=$3 b i
  PATH_OUT=$url
  if ((mount)) && [[ $url == gs://* ]]; then
    b=${url#gs://}; b=${b%%/*}
    [[ -n $b ]] || die "bad GCS URL '$url'"
    PATH_OUT="/gcs/${url#gs://}"
    for i in "${!BUCKETS[@]}"; do
      if [[ ${BUCKETS[$i]} == "$b" ]]; then ((ro)) || BUCKET_RO[i]=0; return 0; fi
    done
    BUCKETS+=("$b"); BUCKET_RO+=("$ro")
  fi
}
[[ $OUTPUT == gs://* ]] || warn "--output '$OUTPUT' is not a gs:// URL; pod-local paths vanish on restart, so the run cannot resume"
to_path "$OUTPUT" 0 "$OUTPUT_FUSE"
CMD+=("--config.output_dir=$PATH_OUT")
if [[ -n $RECORDS ]]; then
  to_path "$RECORDS" 1 "$GCSFUSE"
  CMD+=("--config.data.records=$PATH_OUT")
fi

# Values go into single-quoted YAML scalars, which cannot hold a newline: refuse those up front.
for v in "${CMD[@]}" "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}" "$IMAGE" "$NAMESPACE" "$SERVICE_ACCOUNT"; do
  [[ $v != *$'\n'* ]] || die "newlines are not supported in values: '$v'"
done

# --- YAML rendering ------------------------------------------------------------------------------
q() {  # a YAML single-quoted scalar
  local s=$1
  [[ $s != *$'\n'* ]] || die "newlines are not supported in values: '$s'"
  s=${s//\'/\'\'}
  printf "'%s'" "$s"
}

render() {
  local i b kv ro
  cat <<EOF
# ddspo_jax on GKE TPU: $NUM_SLICES x $TPU_TYPE $TOPOLOGY ($ACCELERATOR, $MACHINE_TYPE),
# $CHIPS chips = $HOSTS host(s) x $CHIPS_PER_HOST chips per slice; $PROCESSES JAX process(es) in all.
# Chip settings (launch/tpu_settings.tsv): ${CHIP_NOTE:-none}
# Rendered by launch/gke_tpu.sh; apply with: kubectl apply -f <this file>
#
# Failure handling: every Job has backoffLimit 0, so any failed pod (a crash, or a node lost to TPU
# maintenance or Spot preemption) fails its slice's Job; JobSet's failurePolicy then recreates the
# whole JobSet, all slices together (a multi-host JAX program cannot continue with a process missing),
# up to maxRestarts times. Every restart runs the same command with the same output_dir, and ddspo_jax
# resumes from the last Orbax checkpoint in it (train.checkpoint_every), so a preemption costs at most
# the steps since that checkpoint.
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: $NAME
  namespace: $(q "$NAMESPACE")
  labels:
    app.kubernetes.io/name: ddspo-jax
  annotations:
    # One slice per node pool: each replicated Job lands on its own TPU slice.
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: $MAX_RESTARTS
  network:
    # The headless service (named like the JobSet) gives every pod the stable DNS name
    # <jobset>-<replicatedJob>-<slice>-<host>.<jobset>; JAX's coordinator is process 0 at
    # $NAME-slice-0-0.$NAME:$COORD_PORT.
    enableDNSHostnames: true
    publishNotReadyAddresses: true
  replicatedJobs:
  - name: slice
    replicas: $NUM_SLICES  # TPU slices
    template:
      spec:
        parallelism: $HOSTS  # one pod per TPU host
        completions: $HOSTS
        completionMode: Indexed
        backoffLimit: 0
        template:
          metadata:
            labels:
              app.kubernetes.io/name: ddspo-jax
EOF
  if ((${#BUCKETS[@]})); then
    cat <<EOF
            annotations:
              gke-gcsfuse/volumes: "true"  # Cloud Storage FUSE CSI driver sidecar
EOF
  fi
  cat <<EOF
          spec:
            restartPolicy: Never
            terminationGracePeriodSeconds: 60
EOF
  [[ -z $SERVICE_ACCOUNT ]] || printf '            serviceAccountName: %s\n' "$(q "$SERVICE_ACCOUNT")"
  cat <<EOF
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: $ACCELERATOR
              cloud.google.com/gke-tpu-topology: $(q "$TOPOLOGY")
EOF
  ((SPOT == 0)) || printf '              cloud.google.com/gke-spot: "true"\n'
  cat <<EOF
            tolerations:
            - key: google.com/tpu
              operator: Exists
              effect: NoSchedule
EOF
  ((SPOT == 0)) || cat <<EOF
            - key: cloud.google.com/gke-spot
              operator: Equal
              value: "true"
              effect: NoSchedule
EOF
  cat <<EOF
            containers:
            - name: ddspo
              image: $(q "$IMAGE")
              imagePullPolicy: IfNotPresent
              command:
EOF
  for a in "${CMD[@]}"; do printf '              - %s\n' "$(q "$a")"; done
  cat <<EOF
              ports:
              - containerPort: $COORD_PORT  # JAX distributed coordinator
              - containerPort: 8471  # TPU runtime
              - containerPort: 8080  # Multislice (megascale) DCN transfers
              env:
              # GKE's TPU webhook adds TPU_WORKER_ID and TPU_WORKER_HOSTNAMES (host index and hosts of the
              # slice); JAX's jax.distributed.initialize() reads them (ddspo_jax.parallel.maybe_initialize_distributed).
              - name: JOBSET_NAME
                valueFrom:
                  fieldRef:
                    fieldPath: metadata.annotations['jobset.sigs.k8s.io/jobset-name']
              - name: REPLICATED_JOB_NAME
                valueFrom:
                  fieldRef:
                    fieldPath: metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']
              - name: SLICE_ID
                valueFrom:
                  fieldRef:
                    fieldPath: metadata.labels['jobset.sigs.k8s.io/job-index']
              - name: PYTHONUNBUFFERED
                value: "1"
EOF
  if ((PROCESSES > 1)); then
    cat <<EOF
              # Process 0 (slice 0, host 0) runs the coordinator; the process id and count come from
              # the TPU environment (TPU_WORKER_ID + MEGASCALE_SLICE_ID x hosts per slice).
              - name: JAX_COORDINATOR_ADDRESS
                value: \$(JOBSET_NAME)-\$(REPLICATED_JOB_NAME)-0-0.\$(JOBSET_NAME):$COORD_PORT
EOF
  fi
  if ((NUM_SLICES > 1)); then
    cat <<EOF
              # Multislice: slices talk over the data-center network through the megascale runtime.
              - name: MEGASCALE_COORDINATOR_ADDRESS
                value: \$(JOBSET_NAME)-\$(REPLICATED_JOB_NAME)-0-0.\$(JOBSET_NAME)
              - name: MEGASCALE_NUM_SLICES
                value: "$NUM_SLICES"
              - name: MEGASCALE_SLICE_ID
                value: \$(SLICE_ID)
              - name: MEGASCALE_PORT
                value: "8080"
EOF
  fi
  for kv in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do
    printf '              - name: %s\n                value: %s\n' "${kv%%=*}" "$(q "${kv#*=}")"
  done
  cat <<EOF
              resources:
                requests:
                  google.com/tpu: $CHIPS_PER_HOST
                limits:
                  google.com/tpu: $CHIPS_PER_HOST
              volumeMounts:
              - name: dshm  # Grain worker processes share batches through /dev/shm
                mountPath: /dev/shm
EOF
  for i in "${!BUCKETS[@]}"; do
    printf '              - name: gcs-%d\n                mountPath: /gcs/%s\n' "$i" "${BUCKETS[$i]}"
  done
  cat <<EOF
            volumes:
            - name: dshm
              emptyDir:
                medium: Memory
EOF
  for i in "${!BUCKETS[@]}"; do
    b=${BUCKETS[$i]} ro=false
    if ((BUCKET_RO[i])); then ro=true; fi
    cat <<EOF
            - name: gcs-$i
              csi:
                driver: gcsfuse.csi.storage.gke.io
                readOnly: $ro
                volumeAttributes:
                  bucketName: $(q "$b")
                  mountOptions: implicit-dirs
EOF
  done
}

MANIFEST=$(render)

if ((DRY_RUN)); then
  printf '%s\n' "$MANIFEST"
  exit 0
fi

# --- apply -----------------------------------------------------------------------------------------
command -v kubectl >/dev/null || die "kubectl not found (use --dry-run to only print the manifest)"
KUBECTL=(kubectl)
if [[ -n $CLUSTER ]]; then
  command -v gcloud >/dev/null || die "gcloud not found (needed for --cluster; or use the current kube context)"
  GC=(gcloud container clusters get-credentials "$CLUSTER")
  [[ -z $PROJECT ]] || GC+=(--project "$PROJECT")
  [[ -z $ZONE ]] || GC+=(--location "$ZONE")
  "${GC[@]}"
fi
[[ -z $CONTEXT ]] || KUBECTL+=(--context "$CONTEXT")
KUBECTL+=(--namespace "$NAMESPACE")

if ! "${KUBECTL[@]}" get crd jobsets.jobset.x-k8s.io >/dev/null 2>&1; then
  warn "the JobSet CRD is not visible in this cluster; install JobSet first (https://jobset.sigs.k8s.io/docs/installation/)"
fi
printf '%s\n' "$MANIFEST" | "${KUBECTL[@]}" apply -f -

K="${KUBECTL[*]}"
SEL="jobset.sigs.k8s.io/jobset-name=$NAME"
cat <<EOF

JobSet $NAME submitted: $NUM_SLICES x $TPU_TYPE $TOPOLOGY, $PROCESSES pod(s) of $CHIPS_PER_HOST chips; output $OUTPUT
Follow process 0 (it does the logging):
  $K logs -f -l $SEL,jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0 -c ddspo
All pods:       $K get pods -l $SEL -o wide -w
All logs:       $K logs -l $SEL -c ddspo --prefix --tail=20
Status:         $K get jobset $NAME
Stop:           $K delete jobset $NAME
EOF
