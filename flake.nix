{
  description = "A reproducible PyTorch training pipeline: weights as a pure function of code, toolchain, data, config and seed";

  # The one pin. flake.lock holds its rev and narHash; changing it changes
  # PIPELINE_LOCK_ID and so the toolchain fingerprint (re-record golden hashes).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # python3Packages.torch (CPU build) has meta.platforms = linux ++ darwin.
      systems = [ "x86_64-linux" "aarch64-linux" "aarch64-darwin" ];

      # One source of truth each: the numeric profile and the dependency list.
      profiles = (builtins.fromJSON (builtins.readFile ./pipeline/profile.json)).profiles;
      project = (builtins.fromTOML (builtins.readFile ./pyproject.toml)).project;
      lockId = "nix:" + (builtins.fromJSON (builtins.readFile ./flake.lock)).nodes.nixpkgs.locked.narHash;

      # "torch==2.13.0" -> ps.torch. The versions are nixpkgs' on this route
      # (see pythonRelaxDeps); tools/check_nix.py checks each name is a nixpkgs attribute.
      pyAttr = req: lib.replaceStrings [ "_" "." ] [ "-" "-" ]
        (lib.toLower (builtins.head (builtins.match "([A-Za-z0-9._-]+).*" req)));
      pyDeps = ps: reqs: map (req: ps.${pyAttr req}) reqs;

      perSystem = system:
        let
          pkgs = nixpkgs.legacyPackages.${system};
          python = pkgs.python3;
          ps = python.pkgs;
          # Profile for this CPU (x86_64 / aarch64) plus the toolchain id: set
          # before the interpreter starts, since ATen, OpenMP and MKL read their
          # variables once at load time (pytorch issue 15359).
          env = profiles.${pkgs.stdenv.hostPlatform.parsed.cpu.name}.env // { PIPELINE_LOCK_ID = lockId; };
          exports = lib.concatStrings (lib.mapAttrsToList (n: v: "export ${n}=${lib.escapeShellArg v}\n") env);
          devPython = python.withPackages (p: pyDeps p (project.dependencies ++ project.optional-dependencies.test));

          pipeline = ps.buildPythonApplication {
            pname = project.name;
            inherit (project) version;
            pyproject = true;
            src = self;
            build-system = [ ps.setuptools ];
            dependencies = pyDeps ps project.dependencies;
            # The pins in pyproject.toml are the pip route's; here nixpkgs decides.
            pythonRelaxDeps = true;
            pypaBuildFlags = [ "--skip-dependency-check" ];
            # PIPELINE_ROOT: data, configs and goldens come from the source in the
            # store; runs/ goes to the working directory. CC: the compiler that
            # builds exact mode's native kernels (pipeline/exact/native.py).
            makeWrapperArgs = lib.concatLists (lib.mapAttrsToList (n: v: [ "--set" n v ])
              (env // { PIPELINE_ROOT = "${self}"; CC = "${pkgs.stdenv.cc}/bin/cc"; }));
            pythonImportsCheck = [ "pipeline" ];
            meta.mainProgram = "pipeline";
          };

          train = {
            type = "app";
            program = "${pkgs.writeShellScript "pipeline-train" ''exec ${lib.getExe pipeline} train "$@"''}";
            meta.description = "Train configs/digits.toml into ./runs and print its weight hash";
          };

          # Trained inside the sandbox: `nix build .#model --rebuild` is the Nix-native bitwise
          # check. stdenv's setup.sh exports SOURCE_DATE_EPOCH (315532800 unless set), and with
          # it run.json holds that time and no duration, so every copied file is a pure
          # function of the inputs (tests/system/test_nix.py trains twice and compares these files).
          model = pkgs.runCommand "pipeline-model" { nativeBuildInputs = [ pipeline ]; } ''
            export HOME=$TMPDIR  # data cache (~/.cache/pipeline); the sandbox HOME is read-only
            pipeline train --runs-dir "$TMPDIR/runs" --quiet
            mkdir $out
            cp "$TMPDIR"/runs/*/{weights.safetensors,run.json,metrics.jsonl,curves.png,trail.bin} $out/
          '';
        in
        {
          packages = {
            default = pipeline;
            inherit model;
          } // lib.optionalAttrs pkgs.stdenv.hostPlatform.isLinux {
            image = pkgs.dockerTools.streamLayeredImage {
              name = "pipeline";
              tag = pipeline.version;
              created = "1970-01-01T00:00:01Z";
              extraCommands = "mkdir -p work && mkdir -m 1777 tmp";
              config = {
                Entrypoint = [ (lib.getExe pipeline) "train" ];
                WorkingDir = "/work";
                Env = [ "HOME=/tmp" ];
              };
            };
          };

          apps = { inherit train; default = train; };

          checks = {
            # The determinism suite in the sandbox: no network, data from the source tree.
            # util-linux: taskset and unshare for the one-core and hostname machines; glibc's
            # bin output: localedef for the locale machines (tests/support/machines.py).
            determinism = pkgs.runCommand "pipeline-determinism" {
              nativeBuildInputs = [ devPython (lib.getBin pkgs.util-linux) (lib.getBin pkgs.glibc) ];
              LOCALE_ARCHIVE = "${pkgs.glibcLocales}/lib/locale/locale-archive";
            } ''
              ${exports}
              export HOME=$TMPDIR
              cp -r ${self} src && chmod -R u+w src && cd src
              python -m pytest -n $NIX_BUILD_CORES -m determinism -p no:cacheprovider
              touch $out
            '';
            # Exact mode trained in the sandbox must equal tests/golden/weights.json's exact
            # entry, which is keyed by the config alone: this toolchain (nixpkgs' torch,
            # OpenBLAS) against the pip route's (torch 2.13, MKL). --require: no entry fails.
            # Then packages.model against this toolchain's pinned entry: none is recorded yet
            # (docs/nix.md), so that line reports "no golden entry" and cannot fail on it.
            golden = pkgs.runCommand "pipeline-golden" { nativeBuildInputs = [ pipeline ]; } ''
              set -o pipefail
              export HOME=$TMPDIR
              pipeline train configs/digits-exact.toml --runs-dir "$TMPDIR/exact" --quiet
              pipeline golden check --require "$TMPDIR"/exact/[0-9a-f]* 2>&1 | tee $out
              pipeline golden check ${model} 2>&1 | tee -a $out
            '';
          };

          devShells.default = pkgs.mkShell {
            packages = [ devPython ];
            shellHook = exports;
          };
        };

      all = lib.genAttrs systems perSystem;
    in
    lib.genAttrs [ "packages" "apps" "checks" "devShells" ] (output: lib.mapAttrs (_: s: s.${output}) all);
}
