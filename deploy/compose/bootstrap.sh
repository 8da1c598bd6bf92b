#!/usr/bin/env bash
# Prepare the folders the compose demo mounts, then write deploy/compose/.env:
#   DATA/cohort/site-1..3   a synthetic 3-hospital cohort (fedmusk synth), each with its tile cache in .fedmusk/
#                           (fedmusk prepare, with the demo configuration the coordinator runs)
#   DATA/certs              the coordinator's folder: the federation's CA and the SuperLink certificate for the name
#                           `coordinator` (fedmusk certs init), and each site's registered public key
#                           certs/sites/site-N/site.pub (fedmusk certs add-site --public-key)
#   DATA/hospitals/site-N   what each hospital keeps: its own key pair (fedmusk certs site-key; site.key never leaves
#                           it) and the CA certificate it received (ca.crt)
#   DATA/coordinator        the coordinator's state and outputs
#
# Usage: deploy/compose/bootstrap.sh [DATA]        (default: deploy/compose/data; safe to run again)
#
# It needs fedmusk: $FEDMUSK if set (a command line), else `fedmusk` on PATH, else the repository's .venv, else the
# hospital image (built here if missing). It never writes outside DATA and deploy/compose/.env.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
data="${1:-$here/data}"
mkdir -p "$data"
data="$(cd "$data" && pwd)"
sites=(site-1 site-2 site-3)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0

config="$repo/configs/demo.yaml"
if [[ -n "${FEDMUSK:-}" ]]; then
  read -r -a fedmusk <<< "$FEDMUSK"
elif command -v fedmusk > /dev/null; then
  fedmusk=(fedmusk)
elif [[ -x "$repo/.venv/bin/fedmusk" ]]; then
  fedmusk=("$repo/.venv/bin/fedmusk")
else
  image="fedmusk-hospital:${FEDMUSK_HOSPITAL_TAG:-cpu}"
  if ! docker image inspect "$image" > /dev/null 2>&1; then
    docker build -f "$repo/deploy/docker/hospital.Dockerfile" --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu \
      -t "$image" "$repo"
  fi
  # the same absolute paths inside the container, so that what fedmusk prints is true on this machine
  fedmusk=(docker run --rm --user "$(id -u):$(id -g)" -v "$data:$data" -w "$data" --entrypoint fedmusk "$image")
  config=/opt/fedmusk/venv/share/fedmusk/configs/demo.yaml
fi
echo "using: ${fedmusk[*]}"

# 1. the cohort (a few minutes on 2 cores)
if [[ ! -f "$data/cohort/${sites[-1]}/manifest.csv" ]]; then
  "${fedmusk[@]}" synth "$data/cohort" --sites "${#sites[@]}"
fi

# 2. the certificates: the hospitals dial `coordinator:9092`, so the SuperLink's certificate must name `coordinator`
if [[ ! -f "$data/certs/ca/ca.crt" ]]; then
  "${fedmusk[@]}" certs init "$data/certs" --host coordinator
fi
# each hospital makes its own key pair and sends only site.pub; the coordinator registers it and sends back ca.crt
for site in "${sites[@]}"; do
  if [[ ! -f "$data/hospitals/$site/site.key" ]]; then
    "${fedmusk[@]}" certs site-key "$data/hospitals/$site" --name "$site"
  fi
  if [[ ! -f "$data/certs/sites/$site/site.pub" ]]; then
    "${fedmusk[@]}" certs add-site "$data/certs" "$site" --public-key "$data/hospitals/$site/site.pub"
  fi
  cp "$data/certs/sites/$site/ca.crt" "$data/hospitals/$site/ca.crt"
done

# 3. each site's tile cache, with the configuration the coordinator runs (resumable: current caches are skipped).
# .fedmusk/ must exist before compose mounts it read-write over the read-only site folder.
for site in "${sites[@]}"; do
  mkdir -p "$data/cohort/$site/.fedmusk"
  "${fedmusk[@]}" prepare "$data/cohort/$site" --config "$config"
done

# 4. the coordinator's state folder, and .env for docker compose
mkdir -p "$data/coordinator"
chmod 700 "$data/coordinator"
cat > "$here/.env" <<EOF
# written by bootstrap.sh; see .env.example
FEDMUSK_DATA=$data
FEDMUSK_UID=$(id -u)
FEDMUSK_GID=$(id -g)
EOF
if [[ "$(id -u)" == 0 ]]; then
  echo "note: you ran this as root, so the containers will run as root too; run it as an ordinary user to avoid that"
fi

cat <<EOF

Ready. Start the federation (CPU):
  cd $here && docker compose up --build --abort-on-container-exit --exit-code-from coordinator
With NVIDIA GPUs:
  cd $here && docker compose -f docker-compose.yml -f docker-compose.gpu.yml up --build \\
      --abort-on-container-exit --exit-code-from coordinator
Results: $data/coordinator/federation (rounds.json, adapter/, mlflow.db); what each site sent:
  ${fedmusk[*]} audit $data/cohort/site-1
EOF
