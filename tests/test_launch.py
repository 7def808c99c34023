"""launch/: GKE TPU JobSet manifests (dry-run, parsed with PyYAML), the topology table, the GPU launcher's
commands and sbatch scripts, and shellcheck on the scripts. Nothing here needs a cluster, kubectl or SLURM:
where a script would call one, a fake on PATH records the call."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
GKE = LAUNCH / "gke_tpu.sh"
GPU = LAUNCH / "gpu.sh"
TABLE = LAUNCH / "tpu_topologies.tsv"

BASE = ["--image", "us-docker.pkg.dev/p/r/ddspo-jax:tpu", "--output", "gs://out-bucket/runs/exp1",
        "--records", "gs://data-bucket/records/pick", "--name", "exp1"]
CMD = ["--", "train", "--config", "configs/toy.py", "--config.train.steps=7"]


def run(script, *args, env=None, path_prefix=None):
    e = dict(os.environ)
    e.update(env or {})
    if path_prefix:
        e["PATH"] = f"{path_prefix}{os.pathsep}{e['PATH']}"
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=e, timeout=60)


def table_rows():
    rows = []
    for line in TABLE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        t, acc, topo, chips, hosts, cph, mt = line.split("\t")
        rows.append(dict(type=t, acc=acc, topo=topo, chips=int(chips), hosts=int(hosts), cph=int(cph), mt=mt))
    return rows


def pod_spec(m):
    return m["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def container(m):
    (c,) = pod_spec(m)["containers"]
    return c


def env_of(m):
    return {e["name"]: e for e in container(m)["env"]}


@pytest.fixture
def fakes(tmp_path):
    """kubectl/gcloud/sbatch stand-ins that log their arguments and stdin."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    for name, body in {
        "kubectl": 'if [ "${*: -2}" = "apply -f" ] || [[ " $* " == *" apply -f - "* ]]; then cat > "$LOG.stdin"; fi',
        "gcloud": ":",
        "sbatch": 'cat > "$LOG.stdin"; echo "4242;cluster"',
    }.items():
        p = bindir / name
        p.write_text(f'#!/usr/bin/env bash\nLOG={shlex.quote(str(log))}\necho "{name} $*" >> "$LOG"\n{body}\n')
        p.chmod(0o755)
    return bindir, log


# --- the topology table -------------------------------------------------------------------------------------------

def test_table_is_consistent():
    rows = table_rows()
    assert {r["type"] for r in rows} >= {"v4", "v5e", "v5p", "v6e"}
    labels = {"v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice", "v5p": "tpu-v5p-slice", "v6e": "tpu-v6e-slice"}
    keys = set()
    for r in rows:
        assert r["acc"] == labels[r["type"]], r
        assert math.prod(int(d) for d in r["topo"].split("x")) == r["chips"], r
        assert r["hosts"] * r["cph"] == r["chips"], r
        assert r["cph"] in (1, 4, 8), r
        assert len(r["topo"].split("x")) == (3 if r["type"] in ("v4", "v5p") else 2), r
        key = (r["type"], r["topo"], r["mt"])
        assert key not in keys, key
        keys.add(key)


# --- gke_tpu.sh manifests ------------------------------------------------------------------------------------------

CASES = [
    # tpu-type, topology, extra args, slices, accelerator label, hosts per slice, chips per host
    ("v5e", "2x4", [], 1, "tpu-v5-lite-podslice", 1, 8),
    ("v5e", "2x4", ["--machine-type", "ct5lp-hightpu-4t"], 1, "tpu-v5-lite-podslice", 2, 4),
    ("v5e", "4x4", [], 2, "tpu-v5-lite-podslice", 4, 4),
    ("v5litepod", "8x8", [], 1, "tpu-v5-lite-podslice", 16, 4),
    ("v5p", "2x2x2", [], 1, "tpu-v5p-slice", 2, 4),
    ("v5p", "2x2x1", [], 1, "tpu-v5p-slice", 1, 4),
    ("v6e", "4x4", [], 4, "tpu-v6e-slice", 4, 4),
    ("tpu-v6e-slice", "1x1", [], 1, "tpu-v6e-slice", 1, 1),
    ("v4", "2x2x4", [], 3, "tpu-v4-podslice", 4, 4),
]


@pytest.mark.parametrize("tpu_type,topology,extra,slices,label,hosts,cph", CASES)
def test_manifest(tpu_type, topology, extra, slices, label, hosts, cph, fakes):
    bindir, log = fakes
    r = run(GKE, "--dry-run", "--tpu-type", tpu_type, "--topology", topology, "--num-slices", str(slices),
            *extra, *BASE, *CMD, path_prefix=bindir)
    assert r.returncode == 0, r.stderr
    assert not log.exists(), "dry-run must not call kubectl/gcloud"
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert len(docs) == 1
    m = docs[0]
    assert m["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and m["kind"] == "JobSet"
    assert m["metadata"]["name"] == "exp1"
    assert m["spec"]["network"]["enableDNSHostnames"] is True
    assert m["spec"]["failurePolicy"]["maxRestarts"] >= 1
    (rj,) = m["spec"]["replicatedJobs"]
    assert rj["replicas"] == slices
    job = rj["template"]["spec"]
    assert job["parallelism"] == job["completions"] == hosts  # one pod per host
    assert job["backoffLimit"] == 0  # a failed pod restarts the JobSet (and the run resumes)
    pod = pod_spec(m)
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == label
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == topology
    c = container(m)
    assert c["image"] == "us-docker.pkg.dev/p/r/ddspo-jax:tpu"
    assert c["resources"]["requests"]["google.com/tpu"] == cph
    assert c["resources"]["limits"]["google.com/tpu"] == cph
    assert c["command"] == ["python", "-m", "ddspo_jax.train", "--config", "configs/toy.py", "--config.train.steps=7",
                            "--config.output_dir=gs://out-bucket/runs/exp1",
                            "--config.data.records=/gcs/data-bucket/records/pick"]
    env = env_of(m)
    assert {"JOBSET_NAME", "REPLICATED_JOB_NAME", "SLICE_ID"} <= set(env)
    processes = hosts * slices
    if processes > 1:
        assert env["JAX_COORDINATOR_ADDRESS"]["value"] == "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME):8476"
    else:
        assert "JAX_COORDINATOR_ADDRESS" not in env
    if slices > 1:
        assert env["MEGASCALE_NUM_SLICES"]["value"] == str(slices)
        assert env["MEGASCALE_SLICE_ID"]["value"] == "$(SLICE_ID)"
        assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"].startswith("$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.")
    else:
        assert not any(k.startswith("MEGASCALE_") for k in env)
    # env vars referenced with $(VAR) must be defined earlier in the list
    names = [e["name"] for e in c["env"]]
    for i, e in enumerate(c["env"]):
        for ref in ("JOBSET_NAME", "REPLICATED_JOB_NAME", "SLICE_ID"):
            if f"$({ref})" in str(e.get("value", "")):
                assert ref in names[:i]
    # Cloud Storage FUSE: the records bucket mounted read-only where the override points; output stays gs://.
    tmpl = m["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert tmpl["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
    csi = {v["csi"]["volumeAttributes"]["bucketName"]: v for v in pod["volumes"] if "csi" in v}
    assert set(csi) == {"data-bucket"}
    assert csi["data-bucket"]["csi"]["readOnly"] is True
    mounts = {vm["name"]: vm["mountPath"] for vm in c["volumeMounts"]}
    assert mounts[csi["data-bucket"]["name"]] == "/gcs/data-bucket"
    assert "# " in r.stdout.splitlines()[0]  # the header comment says what this is


def test_manifest_options(fakes):
    bindir, _ = fakes
    weird = "--config.train.sample_prompts=('it''s a \"cat\"', 'a: b #c')"
    r = run(GKE, "--dry-run", "--tpu-type=v6e", "--topology=2x4", "--no-gcsfuse", "--spot", "--max-restarts", "3",
            "--service-account", "ddspo-ksa", "--namespace", "ml", "--env", "LIBTPU_INIT_ARGS=--xla_tpu_x=true y",
            "--image", "img:1", "--output", "gs://b/o", "--records", "gs://b/r", "--name", "n1",
            "--", "python", "-m", "ddspo_jax.prepare", "--config", "configs/toy.py", weird, path_prefix=bindir)
    assert r.returncode == 0, r.stderr
    m = yaml.safe_load(r.stdout)
    assert m["metadata"]["namespace"] == "ml"
    assert m["spec"]["failurePolicy"]["maxRestarts"] == 3
    pod = pod_spec(m)
    assert pod["serviceAccountName"] == "ddspo-ksa"
    assert pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    assert not any("csi" in v for v in pod["volumes"])
    c = container(m)
    assert c["command"] == ["python", "-m", "ddspo_jax.prepare", "--config", "configs/toy.py", weird,
                            "--config.output_dir=gs://b/o", "--config.data.records=gs://b/r"]
    assert env_of(m)["LIBTPU_INIT_ARGS"]["value"] == "--xla_tpu_x=true y"
    # --gcsfuse-output, same bucket for output and records: one read-write mount, both overrides under it
    r = run(GKE, "--dry-run", "--tpu-type", "v5p", "--topology", "2x2x2", "--image", "i", "--output", "gs://b/o",
            "--records", "gs://b/r", "--gcsfuse-output", "--", "ddspo_jax.train", "--config", "c.py",
            path_prefix=bindir)
    assert r.returncode == 0, r.stderr
    m = yaml.safe_load(r.stdout)
    csi = [v for v in pod_spec(m)["volumes"] if "csi" in v]
    assert len(csi) == 1 and csi[0]["csi"]["readOnly"] is False
    assert csi[0]["csi"]["volumeAttributes"]["bucketName"] == "b"
    assert container(m)["command"] == ["python", "-m", "ddspo_jax.train", "--config", "c.py",
                                       "--config.output_dir=/gcs/b/o", "--config.data.records=/gcs/b/r"]
    assert m["metadata"]["name"].startswith("ddspo-")  # default name


def test_unknown_type_lists_valid_types():
    r = run(GKE, "--dry-run", "--tpu-type", "v9z", "--topology", "2x4", *BASE, *CMD)
    assert r.returncode != 0 and r.stdout == ""
    for t in ("v4", "v5e", "v5p", "v6e", "tpu-v5-lite-podslice"):
        assert t in r.stderr


@pytest.mark.parametrize("tpu_type,topology,expect", [
    ("v5e", "3x3", ["2x4", "4x4", "16x16"]),
    ("v5p", "2x4", ["2x2x1", "2x2x2", "4x4x4"]),
    ("v6e", "2x2x2", ["1x1", "8x16"]),
])
def test_unknown_topology_lists_valid_ones(tpu_type, topology, expect):
    r = run(GKE, "--dry-run", "--tpu-type", tpu_type, "--topology", topology, *BASE, *CMD)
    assert r.returncode != 0 and r.stdout == ""
    assert f"'{topology}'" in r.stderr
    for t in expect:
        assert t in r.stderr


def test_unknown_machine_type_rejected():
    r = run(GKE, "--dry-run", "--tpu-type", "v5e", "--topology", "4x4", "--machine-type", "ct5lp-hightpu-8t",
            *BASE, *CMD)
    assert r.returncode != 0 and "ct5lp-hightpu-4t" in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--topology", "4x4", *BASE, *CMD], "--tpu-type"),
    (["--tpu-type", "v5e", *BASE, *CMD], "--topology"),
    (["--tpu-type", "v5e", "--topology", "4x4", "--output", "gs://b/o", *CMD], "--image"),
    (["--tpu-type", "v5e", "--topology", "4x4", "--image", "i", *CMD], "--output"),
    (["--tpu-type", "v5e", "--topology", "4x4", *BASE], "command"),
    (["--tpu-type", "v5e", "--topology", "4x4", *BASE, "--num-slices", "0", *CMD], "--num-slices"),
    (["--tpu-type", "v5e", "--topology", "4x4", *BASE, "--name", "Bad_Name", *CMD], "--name"),
    (["--tpu-type", "v5e", "--topology", "4x4", *BASE, "--bogus", "1", *CMD], "--bogus"),
    (["--tpu-type", "v5e", "--topology", "4x4", *BASE, "--env", "NOEQUALS", *CMD], "--env"),
    (["--tpu-type", "v5e", "--topology", "4x4", *BASE, "stray", *CMD], "stray"),
    (["--tpu-type", "v5e", "--topology", "4x4", *BASE, "--", "train", "--config.x=a\nb"], "newlines"),
])
def test_bad_arguments(args, msg):
    r = run(GKE, "--dry-run", *args)
    assert r.returncode != 0 and r.stdout == ""
    assert msg in r.stderr


def test_help_lists_options():
    r = run(GKE, "--help")
    assert r.returncode == 0 and r.stderr == ""
    for opt in ("--cluster", "--project", "--zone", "--context", "--tpu-type", "--topology", "--num-slices",
                "--machine-type", "--image", "--name", "--records", "--output", "--dry-run", "--max-restarts",
                "--no-gcsfuse", "--gcsfuse-output", "--service-account", "--env", "--spot", "--no-chip-settings"):
        assert opt in r.stdout, opt


def test_apply_uses_kubectl_and_prints_log_commands(fakes):
    bindir, log = fakes
    args = ["--tpu-type", "v5e", "--topology", "4x4", *BASE, *CMD]
    dry = run(GKE, "--dry-run", *args)
    r = run(GKE, "--cluster", "c1", "--project", "p1", "--zone", "us-west4-a", "--context", "ctx", *args,
            path_prefix=bindir)
    assert r.returncode == 0, r.stderr
    calls = log.read_text()
    assert "gcloud container clusters get-credentials c1 --project p1 --location us-west4-a" in calls
    assert "apply -f -" in calls and "--context ctx" in calls
    assert Path(str(log) + ".stdin").read_text() == dry.stdout  # applies exactly the dry-run manifest
    assert "logs -f" in r.stdout and "jobset.sigs.k8s.io/jobset-name=exp1" in r.stdout
    assert "delete jobset exp1" in r.stdout


def test_apply_without_kubectl_fails_cleanly(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "cat", "date", "dirname", "basename", "awk"):
        if shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bindir)}
    args = ["--tpu-type", "v5e", "--topology", "4x4", *BASE, *CMD]
    r = subprocess.run([shutil.which("bash"), str(GKE), *args], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "kubectl not found" in r.stderr
    r = subprocess.run([shutil.which("bash"), str(GKE), "--dry-run", *args], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["kind"] == "JobSet"


# --- per-chip settings (launch/tpu_settings.tsv) ------------------------------------------------------------------

SETTINGS = LAUNCH / "tpu_settings.tsv"
HBM = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}  # GiB per chip, the vendors' figures


def settings_rows():
    rows = []
    for line in SETTINGS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            c, t, micro, remat, fsdp, peak, hbm, source = line.split("\t")
            rows.append(dict(config=c, type=t, micro=int(micro), remat=remat, fsdp=int(fsdp), peak=float(peak),
                             hbm=float(hbm), source=source))
    return rows


def test_chip_settings_rows_fit_their_chip_with_a_margin():
    """Every row names a shipped config (and variant) that loads, a TPU type of the topology table, a remat
    policy the config accepts, and a per-chip peak under 85 % of that chip's HBM, with the compiler it came from."""
    from ddspo_jax.config import SCHEMA, check_config_file

    rows = settings_rows()
    assert {(r["config"], r["type"]) for r in rows} >= {(c, t) for c in ("sd15.py", "sdxl.py") for t in ("v5e", "v6e", "v5p")}
    types = {r["type"] for r in table_rows()}
    assert len({(r["config"], r["type"]) for r in rows}) == len(rows)  # one row per (config, chip)
    for r in rows:
        assert r["type"] in types, r
        assert r["hbm"] == HBM[r["type"]], r
        assert 0 < r["peak"] <= 0.85 * r["hbm"], r
        assert r["micro"] >= 1 and (r["fsdp"] == -1 or r["fsdp"] >= 1), r
        assert r["remat"] in SCHEMA["model.remat_policy"].choices, r
        assert any(w in r["source"] for w in ("libtpu", "XLA:CPU", "XLA:GPU")), r
        check_config_file(["train", "--config", str(ROOT / "configs" / r["config"])])  # exits on a bad file/variant


def _resolved(command):
    """The run's config as ddspo_jax parses the manifest's command line (config_flags, overrides in order)."""
    script = ("import json\nfrom absl import app\nfrom ddspo_jax.config import define_config_flag\n"
              "F = define_config_flag('configs/tiny.py')\n"
              "def main(_):\n    c = F.value\n    print(json.dumps(dict(micro=c.train.micro_batch_per_device, "
              "remat=c.model.remat_policy, fsdp=c.mesh.fsdp, data=c.mesh.data, out=c.output_dir)))\n"
              "app.run(main)\n")
    assert command[:3] == ["python", "-m", "ddspo_jax.train"]
    r = subprocess.run([sys.executable, "-c", script, *command[3:]], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_tpu_type_inserts_the_chips_settings_before_the_users_overrides():
    """--tpu-type v5e with configs/sdxl.py: the row's micro-batch, remat and mesh go right after --config (the
    manifest says which and why), the user's own --config.train.micro_batch_per_device=2 still wins, and the
    config ddspo_jax parses from that command holds both; fsdp is capped at the slice's chips; --no-chip-settings
    and a config without a row leave the command as given (a warning names the missing row)."""
    row = {(r["config"], r["type"]): r for r in settings_rows()}
    sdxl = row[("sdxl.py", "v5e")]
    r = run(GKE, "--dry-run", "--tpu-type", "v5e", "--topology", "2x4", *BASE, "--", "train", "--config",
            "configs/sdxl.py", "--config.train.micro_batch_per_device=2")
    assert r.returncode == 0, r.stderr
    m = yaml.safe_load(r.stdout)
    cmd = container(m)["command"]
    assert cmd[3:9] == ["--config", "configs/sdxl.py", f"--config.train.micro_batch_per_device={sdxl['micro']}",
                        f"--config.model.remat_policy={sdxl['remat']}", "--config.mesh.fsdp=-1", "--config.mesh.data=1"]
    assert cmd[9] == "--config.train.micro_batch_per_device=2"
    assert "tpu_settings.tsv" in r.stderr and f"peak {sdxl['peak']}" in r.stdout.split("apiVersion")[0]
    got = _resolved(cmd)
    assert got == dict(micro=2, remat=sdxl["remat"], fsdp=-1, data=1, out="gs://out-bucket/runs/exp1")

    # a slice larger than the row's fsdp: fsdp as the row says, data parallel over the rest
    sd15 = row[("sd15.py", "v5e")]
    r = run(GKE, "--dry-run", "--tpu-type", "v5e", "--topology", "8x8", *BASE, "--", "train",
            "--config=configs/sd15.py")
    assert r.returncode == 0, r.stderr
    got = _resolved(container(yaml.safe_load(r.stdout))["command"])
    want_fsdp = sd15["fsdp"] if 0 < sd15["fsdp"] < 64 else -1
    assert (got["micro"], got["fsdp"], got["data"]) == (sd15["micro"], want_fsdp, -1 if want_fsdp > 0 else 1)

    for extra, cfg in ((["--no-chip-settings"], "configs/sdxl.py"), ([], "configs/toy.py")):
        r = run(GKE, "--dry-run", "--tpu-type", "v5e", "--topology", "2x4", *extra, *BASE, "--", "train",
                "--config", cfg)
        assert r.returncode == 0, r.stderr
        cmd = container(yaml.safe_load(r.stdout))["command"]
        assert not any(a.startswith(("--config.train.micro", "--config.mesh")) for a in cmd), cmd
    assert "no row for 'toy.py' on v5e" in r.stderr


# --- gpu.sh --------------------------------------------------------------------------------------------------------

def test_gpu_local_dry_run():
    r = run(GPU, "local", "--dry-run", "--gpus", "0,1,2,3", "--output", "runs/x", "--records", "/data/rec s",
            "--", "train", "--config", "configs/toy.py", "--config.train.steps=3")
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[0] == "env" and "CUDA_VISIBLE_DEVICES=0,1,2,3" in argv
    assert "-u" in argv and "SLURM_NTASKS" in argv  # an enclosing allocation must not go multi-process
    i = argv.index("python")
    assert argv[i:] == ["python", "-m", "ddspo_jax.train", "--config", "configs/toy.py", "--config.train.steps=3",
                        "--config.output_dir=runs/x", "--config.data.records=/data/rec s"]


def sbatch_lines(text):
    return [ln.split(None, 1)[1] for ln in text.splitlines() if ln.startswith("#SBATCH ")]


def srun_argv(text):
    (line,) = [ln for ln in text.splitlines() if ln.startswith("srun ")]
    return shlex.split(line)


@pytest.mark.parametrize("per,nodes,gpn,tasks_per_node", [("gpu", 2, 8, 8), ("node", 4, 4, 1), ("gpu", 1, 2, 2)])
def test_gpu_slurm_dry_run(per, nodes, gpn, tasks_per_node, tmp_path):
    r = run(GPU, "slurm", "--dry-run", "--per", per, "--nodes", str(nodes), "--gpus-per-node", str(gpn),
            "--partition", "gpu", "--time", "2:00:00", "--account", "acct", "--cpus-per-task", "6",
            "--venv", "/shared/venv", "--output", "/shared/runs/x", "--records", "/shared/rec",
            "--sbatch-arg=--exclusive", "--env", "XLA_FLAGS=--a=1 --b=2",
            "--", "train", "--config", "configs/toy.py")
    assert r.returncode == 0, r.stderr
    s = r.stdout
    assert s.startswith("#!/usr/bin/env bash\n")
    sb = sbatch_lines(s)
    for want in (f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", f"--gpus-per-node={gpn}",
                 "--partition=gpu", "--time=2:00:00", "--account=acct", "--cpus-per-task=6", "--requeue",
                 "--exclusive", "--output=/shared/runs/x/slurm/%x-%j.out"):
        assert want in sb, (want, sb)
    argv = srun_argv(s)
    assert argv[0] == "srun" and f"--ntasks={nodes * tasks_per_node}" in argv
    assert f"--ntasks-per-node={tasks_per_node}" in argv
    i = argv.index("python")
    assert argv[i:] == ["python", "-m", "ddspo_jax.train", "--config", "configs/toy.py",
                        "--config.output_dir=/shared/runs/x", "--config.data.records=/shared/rec"]
    assert ". /shared/venv/bin/activate" in s
    if per == "node":
        assert f"export JAX_LOCAL_DEVICE_IDS={','.join(map(str, range(gpn)))}" in s
    else:
        assert "JAX_LOCAL_DEVICE_IDS" not in s
    # The rendered script is valid bash and exports the extra env exactly.
    path = tmp_path / "job.sbatch"
    path.write_text(s)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    line = [ln for ln in s.splitlines() if ln.startswith("export XLA_FLAGS=")][0]
    out = subprocess.run(["bash", "-c", f"{line}; printf %s \"$XLA_FLAGS\""], capture_output=True, text=True)
    assert out.stdout == "--a=1 --b=2"
    if shutil.which("shellcheck"):
        sc = subprocess.run(["shellcheck", "-s", "bash", str(path)], capture_output=True, text=True)
        assert sc.returncode == 0, sc.stdout


def test_gpu_slurm_submit_and_no_requeue(fakes, tmp_path):
    bindir, log = fakes
    r = run(GPU, "slurm", "--nodes", "2", "--no-requeue", "--log-dir", str(tmp_path / "logs"), "--job-name", "j1",
            "--", "train", "--config", "c.py", path_prefix=bindir)
    assert r.returncode == 0, r.stderr
    assert "sbatch --parsable" in log.read_text()
    submitted = Path(str(log) + ".stdin").read_text()
    assert "--requeue" not in sbatch_lines(submitted) and "--job-name=j1" in sbatch_lines(submitted)
    assert "4242" in r.stdout and f"{tmp_path / 'logs'}/j1-4242.out" in r.stdout
    assert (tmp_path / "logs").is_dir()


@pytest.mark.parametrize("args,msg", [
    ([], "local"),
    (["cloud", "--", "train"], "'cloud'"),
    (["slurm", "--dry-run"], "command"),
    (["slurm", "--dry-run", "--per", "socket", "--", "train"], "--per"),
    (["slurm", "--dry-run", "--nodes", "0", "--", "train"], "--nodes"),
    (["local", "--dry-run", "--gpus", "a,b", "--", "train"], "--gpus"),
    (["local", "--dry-run", "--nodes", "2", "--bogus", "--", "train"], "--bogus"),
    (["slurm", "--in-allocation", "--", "train"], "SLURM_JOB_ID"),
])
def test_gpu_bad_arguments(args, msg):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(GPU), *args], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0
    assert msg in r.stderr


def test_gpu_help():
    r = run(GPU, "--help")
    assert r.returncode == 0
    for opt in ("local", "slurm", "--nodes", "--gpus-per-node", "--per", "--gpus", "--partition", "--time",
                "--output", "--records", "--venv", "--dry-run", "--in-allocation", "--no-requeue"):
        assert opt in r.stdout, opt


# --- Dockerfile, shellcheck ------------------------------------------------------------------------------------------

def test_dockerfile_variants():
    text = (LAUNCH / "Dockerfile").read_text()
    assert "ARG ACCELERATOR=tpu" in text
    assert '"jax[$extra]==${JAX_VERSION}"' in text and "extra=tpu" in text and "extra=cuda12" in text
    assert "pip install ." in text and 'ENTRYPOINT ["python"]' in text
    # The case statement maps the build arg and rejects anything else.
    run_block = text[text.index("RUN set -eux"):text.index("WORKDIR")]
    shell = run_block.replace("RUN ", "", 1).replace("\\\n", "\n").replace("pip install", "echo")
    for acc, want in (("tpu", "jax[tpu]==0.10.2"), ("cuda", "jax[cuda12]==0.10.2")):
        r = subprocess.run(["sh", "-c", shell], capture_output=True, text=True,
                           env={**os.environ, "ACCELERATOR": acc, "JAX_VERSION": "0.10.2"})
        assert r.returncode == 0 and r.stdout.strip() == want, (r.stdout, r.stderr)
    r = subprocess.run(["sh", "-c", shell], capture_output=True, text=True,
                       env={**os.environ, "ACCELERATOR": "rocm", "JAX_VERSION": "0.10.2"})
    assert r.returncode != 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", [GKE, GPU], ids=lambda p: p.name)
def test_shellcheck(script):
    r = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
