{
  description = "A reproducible PyTorch training pipeline: weights as a pure function of code, toolchain, data, config and seed";

  # The one pin. flake.lock holds its rev and narHash; the toolchain id (PIPELINE_LOCK_ID)
  # is the narHash of the nixpkgs actually used, so --override-input and follows change it.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # Linux only: the determinism check's machines need util-linux (taskset, unshare) and
      # glibc (localedef, the locale archive), which nixpkgs builds for Linux alone, and
      # nothing here has run on Darwin (docs/nix.md).
      systems = [ "x86_64-linux" "aarch64-linux" ];

      # One source of truth each: the numeric profile and the dependency list.
      profiles = (builtins.fromJSON (builtins.readFile ./pipeline/profile.json)).profiles;
      project = (builtins.fromTOML (builtins.readFile ./pyproject.toml)).project;
      lockId = "nix:" + nixpkgs.narHash;

      # Sources by what reads them, so that editing docs/, bench/, CHANGELOG.md or .github/
      # rebuilds nothing. The package: its code and metadata (the wheel's METADATA holds
      # README.md). The root the wrapper points at: data, configs, examples, goldens. The
      # checks: everything the suite reads, the flake files included (tests/system/test_nix.py).
      files = paths: lib.fileset.toSource { root = ./.; fileset = lib.fileset.unions paths; };
      packageSrc = files [ ./pyproject.toml ./README.md ./pipeline ];
      rootSrc = files [ ./data-manifest.json ./data ./configs ./examples ./tests/golden ];
      checkSrc = files [ ./pyproject.toml ./requirements.lock ./pipeline ./tests ./data-manifest.json
        ./data ./configs ./examples ./flake.nix ./flake.lock ./nix ./tools/check_nix.py ];

      # "torch==2.13.0" -> ps.torch. The versions are nixpkgs' on this route
      # (see pythonRelaxDeps); tools/check_nix.py checks each name is a nixpkgs attribute.
      pyAttr = req: lib.replaceStrings [ "_" "." ] [ "-" "-" ]
        (lib.toLower (builtins.head (builtins.match "([A-Za-z0-9._-]+).*" req)));
      pyDeps = ps: reqs: map (req: ps.${pyAttr req}) reqs;

      # Profile for this CPU (x86_64 / aarch64) plus the toolchain id: set before the
      # interpreter starts, since ATen, OpenMP, MKL and OpenBLAS read their variables once
      # at load time (pytorch issue 15359).
      envFor = pkgs: profiles.${pkgs.stdenv.hostPlatform.parsed.cpu.name}.env // { PIPELINE_LOCK_ID = lockId; };

      # The package for any nixpkgs: the flake's own below, and a user's through the overlay.
      pipelineFor = pkgs:
        let ps = pkgs.python3.pkgs;
        in ps.buildPythonApplication {
          pname = project.name;
          inherit (project) version;
          pyproject = true;
          src = packageSrc;
          build-system = [ ps.setuptools ];
          dependencies = pyDeps ps project.dependencies;
          # The pins in pyproject.toml are the pip route's; here nixpkgs decides.
          pythonRelaxDeps = true;
          pypaBuildFlags = [ "--skip-dependency-check" ];
          # The profile is forced (--set): a stray thread count in the user's shell must not
          # change the bits.
          # PIPELINE_ROOT (data, configs, goldens from the store; runs/ goes to the working
          # directory) and CC (the compiler for exact mode's native kernels,
          # pipeline/exact/native.py) are defaults a user may point elsewhere (--set-default).
          makeWrapperArgs =
            lib.concatLists (lib.mapAttrsToList (n: v: [ "--set" n v ]) (envFor pkgs))
            ++ lib.concatLists (lib.mapAttrsToList (n: v: [ "--set-default" n v ])
              { PIPELINE_ROOT = "${rootSrc}"; CC = "${pkgs.stdenv.cc}/bin/cc"; });
          pythonImportsCheck = [ "pipeline" ];
          meta.mainProgram = "pipeline";
        };

      perSystem = system:
        let
          pkgs = nixpkgs.legacyPackages.${system};
          env = envFor pkgs;
          exports = lib.concatStrings (lib.mapAttrsToList (n: v: "export ${n}=${lib.escapeShellArg v}\n") env);
          devPython = pkgs.python3.withPackages (p: pyDeps p (project.dependencies ++ project.optional-dependencies.test));
          pipeline = pipelineFor pkgs;

          train = {
            type = "app";
            program = "${pkgs.writeShellScript "pipeline-train" ''exec ${lib.getExe pipeline} train "$@"''}";
            meta.description = "Train configs/digits.toml into ./runs and print its weight hash";
          };

          # Trained inside the sandbox: `nix build .#model && nix build .#model --rebuild` is the
          # Nix-native bitwise check (--rebuild needs the first build's output to compare with).
          # stdenv's setup.sh exports SOURCE_DATE_EPOCH (315532800 unless set), and with it
          # run.json holds that time and no duration; --threads 1 keeps run.json's thread record
          # off the builder's core count. Every copied file is then a pure function of the
          # inputs (tests/system/test_nix.py trains twice and compares these files).
          model = pkgs.runCommand "pipeline-model" { nativeBuildInputs = [ pipeline ]; } ''
            export HOME=$TMPDIR  # data cache (~/.cache/pipeline); the sandbox HOME is read-only
            pipeline train --runs-dir "$TMPDIR/runs" --threads 1 --quiet
            mkdir $out
            cp "$TMPDIR"/runs/*/{weights.safetensors,run.json,metrics.jsonl,curves.png,trail.bin} $out/
          '';
        in
        {
          packages = {
            default = pipeline;
            inherit model;
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
            # runCommandCC: stdenv's C compiler on PATH, so exact mode's native kernels build
            # (runCommand has none). util-linux: taskset and unshare for the one-core and
            # hostname machines; glibc's bin output: localedef for the locale machines, which
            # fall back to glibcLocales' archive (LOCALE_ARCHIVE) for a locale it cannot
            # compile (pipeline/audit/machines.py). Workers: the builder's cores (0 means all),
            # at most 8 (each trains in processes of its own).
            determinism = pkgs.runCommandCC "pipeline-determinism" {
              nativeBuildInputs = [ devPython (lib.getBin pkgs.util-linux) (lib.getBin pkgs.glibc) ];
              LOCALE_ARCHIVE = "${pkgs.glibcLocales}/lib/locale/locale-archive";
            } ''
              ${exports}
              export HOME=$TMPDIR
              cp -r ${checkSrc} src && chmod -R u+w src && cd src
              workers=''${NIX_BUILD_CORES:-0}
              if [ "$workers" -lt 1 ]; then workers=$(nproc); fi
              python -m pytest -n "$workers" --maxprocesses 8 -m determinism -p no:cacheprovider
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
              pipeline train configs/digits-exact.toml --runs-dir "$TMPDIR/exact" --threads 1 --quiet
              pipeline golden check --require "$TMPDIR"/exact/[0-9a-f]* 2>&1 | tee $out
              pipeline golden check ${model} 2>&1 | tee -a $out
            '';
          };

          devShells.default = pkgs.mkShell {
            packages = [ devPython ];
            shellHook = exports;
          };

          # `nix fmt`: nixpkgs' RFC 166 formatter.
          formatter = pkgs.nixfmt;
        };

      all = lib.genAttrs systems perSystem;
    in
    lib.genAttrs [ "packages" "apps" "checks" "devShells" "formatter" ] (output: lib.mapAttrs (_: s: s.${output}) all)
    // {
      # `pipeline` built with the user's own nixpkgs (their torch, their pins):
      # nixpkgs.overlays = [ inputs.pipeline.overlays.default ]; then pkgs.pipeline.
      overlays.default = final: _prev: { pipeline = pipelineFor final; };
    };
}
