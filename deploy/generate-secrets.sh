#!/bin/sh
# Fresh random secrets for a deployment, written to a file git ignores
# (deploy/.gitignore): nothing secret is ever committed.
#
#   deploy/generate-secrets.sh k8s [FILE]      default FILE: deploy/k8s/overlays/example/secrets.env
#   deploy/generate-secrets.sh compose [FILE]  default FILE: deploy/.env
#
# k8s:     the env file the overlay's secretGenerator reads; kustomize makes the
#          Secret cachesvc-secrets from it (keys token, peer-token,
#          aws-access-key-id, aws-secret-access-key).
# compose: the variables docker-compose.yml requires (CACHESVC_TOKEN,
#          CACHESVC_PEER_TOKEN, MINIO_ROOT_USER, MINIO_ROOT_PASSWORD); compose
#          reads deploy/.env by itself (the compose file's directory).
#
# Tokens and the S3 secret key are 32 bytes from /dev/urandom, as 64 hex
# digits; the bundled MinIO takes the S3 key pair as its root user and
# password. For real S3 with static keys, put yours in the file's last two
# lines (never read from your shell's AWS_* here: a personal key would end up in
# the cluster unnoticed). The file is created mode 0600; an existing file is
# never overwritten (to rotate: delete it, run this again, re-apply, restart
# the workloads).
set -eu

mode=${1:-}
here=$(cd "$(dirname "$0")" && pwd)
case "$mode" in
k8s) out=${2:-$here/k8s/overlays/example/secrets.env} ;;
compose) out=${2:-$here/.env} ;;
*)
    echo "usage: $0 k8s|compose [FILE]" >&2
    exit 2
    ;;
esac
if [ -e "$out" ]; then
    echo "$0: $out exists; not overwriting it (delete it to rotate the secrets)" >&2
    exit 1
fi

random_hex() { # $1 bytes
    od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'
}

token=$(random_hex 32)
peer_token=$(random_hex 32)
key_id=cachesvc-$(random_hex 6)
secret=$(random_hex 32)

umask 077
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
if [ "$mode" = k8s ]; then
    printf 'token=%s\npeer-token=%s\naws-access-key-id=%s\naws-secret-access-key=%s\n' \
        "$token" "$peer_token" "$key_id" "$secret" >"$tmp"
else
    printf 'CACHESVC_TOKEN=%s\nCACHESVC_PEER_TOKEN=%s\nMINIO_ROOT_USER=%s\nMINIO_ROOT_PASSWORD=%s\n' \
        "$token" "$peer_token" "$key_id" "$secret" >"$tmp"
fi
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out (mode 0600)" >&2
