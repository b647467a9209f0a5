#!/bin/sh
# Writes the git-ignored secret files of deploy/, each only if it does not exist yet (the database keeps the
# password it was created with, so an existing file is never overwritten):
#   deploy/mlflow/db.env, deploy/mlflow/auth.env   random passwords, kustomize secretGenerator (kubectl apply -k)
#   deploy/mlflow/.env                             the same values for docker compose (deploy/mlflow/docker-compose.yml)
#   deploy/mlflow/bucket.env                       Secret skeldiff-bucket: the object store's credentials, copied
#                                                  from this shell's AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and,
#                                                  when set, AWS_ENDPOINT_URL (MinIO, on-prem S3), AWS_DEFAULT_REGION
# Usage: [AWS_...=...] sh deploy/make-secrets.sh [DIR]   (DIR: where the files go, default: deploy/mlflow)
set -eu
dir=${1:-$(dirname "$0")/mlflow}
umask 077                                  # the files are readable by their owner only

random() {  # $1 random bytes as hex: URL-safe, so a value may also appear in a URI
    od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
}

write() {  # write FILE from stdin unless FILE exists
    if [ -e "$1" ]; then
        echo "kept    $1 (exists)"
        cat > /dev/null
    else
        cat > "$1"
        echo "wrote   $1"
    fi
}

user=skeldiff
db=$(random 24)
admin=$(random 24)
flask=$(random 32)
write "$dir/db.env" <<END
password=$db
END
write "$dir/auth.env" <<END
username=$user
password=$admin
flask-secret-key=$flask
END
write "$dir/.env" <<END
SKELDIFF_DB_PASSWORD=$db
MLFLOW_ADMIN_USERNAME=$user
MLFLOW_ADMIN_PASSWORD=$admin
MLFLOW_FLASK_SECRET_KEY=$flask
MLFLOW_ALLOWED_HOSTS=
MLFLOW_PORT=5000
END

# The bucket's credentials are yours, not generated: taken from the environment, never from an argument (a command
# line shows up in `ps` and shell history). Optional variables that are unset are left out, so the Secret lacks
# them and the pods (secretKeyRef optional: true) do not get them either.
if [ -e "$dir/bucket.env" ]; then
    echo "kept    $dir/bucket.env (exists)"
elif [ -z "${AWS_ACCESS_KEY_ID-}" ] || [ -z "${AWS_SECRET_ACCESS_KEY-}" ]; then
    echo "skipped $dir/bucket.env: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for" \
         "MinIO or on-prem S3, AWS_DEFAULT_REGION) and run this again" >&2
else
    for var in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL AWS_DEFAULT_REGION; do
        eval "value=\${$var-}"
        [ -z "$value" ] || printf '%s=%s\n' "$var" "$value"
    done | write "$dir/bucket.env"
fi
