#!/bin/sh
# Writes the git-ignored secret files of deploy/ with random values, each only if it does not exist yet (the
# database keeps the password it was created with, so an existing file is never overwritten):
#   deploy/mlflow/db.env, deploy/mlflow/auth.env   kustomize secretGenerator (kubectl apply -k deploy/)
#   deploy/mlflow/.env                             docker compose (deploy/mlflow/docker-compose.yml)
# Usage: sh deploy/make-secrets.sh [DIR]   (DIR: where the files go, default: deploy/mlflow beside this script)
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
