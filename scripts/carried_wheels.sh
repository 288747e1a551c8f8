# Sourced by the device scripts: `install_carried_wheels SITE` installs the wheels in .whl/,
# if any (for a machine without a package index), into SITE and puts SITE first on
# PYTHONPATH.
install_carried_wheels() {
    local site=$1
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    fi
}
