# Not used by the flake. tools/check_nix.py evaluates the flake's outputs
# against this stand-in for nixpkgs (Nix 2.8 can evaluate it; nothing is
# built or fetched) and returns what the checker compares: output names,
# wrapper and shell environments, check scripts, image config.
# narHash: stands for the nixpkgs input's own narHash (as under --override-input); null
# keeps flake.lock's.
{ flake, pythonAttrs, source ? "/nix/store/00000000000000000000000000000000-source", narHash ? null }:
let
  upper = lib.stringToCharacters "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
  lower = lib.stringToCharacters "abcdefghijklmnopqrstuvwxyz";
  lib = rec {
    genAttrs = names: f: builtins.listToAttrs (map (name: { inherit name; value = f name; }) names);
    mapAttrs = builtins.mapAttrs;
    mapAttrsToList = f: a: map (n: f n a.${n}) (builtins.attrNames a);
    concatLists = builtins.concatLists;
    concatStrings = builtins.concatStringsSep "";
    replaceStrings = builtins.replaceStrings;
    stringToCharacters = s: builtins.genList (i: builtins.substring i 1 s) (builtins.stringLength s);
    toLower = builtins.replaceStrings upper lower;
    # As nixpkgs' lib: safe strings stay bare, others are single-quoted.
    escapeShellArg = s: if builtins.match "[[:alnum:],._+:@%/-]+" s != null then s
      else "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] s + "'";
    optionalAttrs = cond: a: if cond then a else { };
    getExe = d: "${d}/bin/${d.meta.mainProgram}";
    getBin = d: d.bin or d;
    # lib.fileset (lib/fileset/default.nix): a source holding only the listed paths. The
    # stand-in's store path names them, relative to root, so the checker can read them.
    fileset = {
      unions = paths: paths;
      toSource = { root, fileset }: {
        outPath = "/stub/fileset:" + builtins.concatStringsSep "," (map (p:
          builtins.substring (builtins.stringLength (toString root) + 1) 4096 (toString p)) fileset);
      };
    };
  };
  drv = name: attrs: attrs // { inherit name; outPath = "/stub/${name}"; };
  # A builder's result also records the argument names it was called with, which
  # tools/check_nix.py compares with nixpkgs' own signatures.
  called = name: args: drv name args // { argNames = builtins.attrNames args; };
  mkPkgs = system:
    let
      isLinux = builtins.match ".*-linux" system != null;
      # As nixpkgs' meta.platforms check: using a Linux-only package on another system is an
      # evaluation error, not a package that fails later.
      linuxOnly = name: attrs: if isLinux then drv name attrs
        else throw "${name} is not available on ${system} (meta.platforms: Linux only)";
      pyPkgs = lib.genAttrs pythonAttrs (a: drv "py-${a}" { pname = a; }) // {
        buildPythonApplication = args: called args.pname args;
      };
    in
    {
      stdenv.cc = drv "gcc-wrapper" { };  # nixpkgs' C compiler (a cc-wrapper): bin/cc
      stdenv.hostPlatform = {
        parsed.cpu.name = builtins.head (builtins.split "-" system);
        inherit isLinux;
      };
      python3 = {
        pkgs = pyPkgs;
        withPackages = f: drv "python-env" { packages = map (p: p.pname) (f pyPkgs); };
      };
      # runCommand uses stdenvNoCC, runCommandCC stdenv (pkgs/build-support/trivial-builders):
      # which one built a script is recorded as `builder`.
      runCommand = name: attrs: script: called name attrs // { inherit script; builder = "runCommand"; };
      runCommandCC = name: attrs: script: called name attrs // { inherit script; builder = "runCommandCC"; };
      nixfmt = drv "nixfmt" { };
      # The script's text rides in its path so that apps.*.program shows it.
      writeShellScript = name: text: drv name { } // { outPath = "/stub/${name}#${text}"; };
      mkShell = called "shell";
      dockerTools.streamLayeredImage = args: called args.name args;
      # Multiple-output packages as in nixpkgs: taskset/unshare and localedef live in `bin`.
      util-linux = linuxOnly "util-linux" { bin = drv "util-linux-bin" { }; };
      glibc = linuxOnly "glibc" { bin = drv "glibc-bin" { }; };
      glibcLocales = linuxOnly "glibc-locales" { };
    };
  systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
  lock = builtins.fromJSON (builtins.readFile (dirOf flake + "/flake.lock"));
  outs = (import flake).outputs {
    self = { outPath = source; };
    nixpkgs = lock.nodes.nixpkgs.locked // { inherit lib; legacyPackages = lib.genAttrs systems mkPkgs; }
      // (if narHash == null then { } else { inherit narHash; });
  };
  # Per output: per system its attribute names; `formatter` and `overlays` (no per-system
  # attribute sets) their own names.
  names = builtins.mapAttrs (output: value:
    if output == "formatter" || output == "overlays" then builtins.attrNames value
    else builtins.mapAttrs (_: builtins.attrNames) value) outs;
in
{
  inherit names source;
  systems = builtins.mapAttrs (system: packages: let
    runCommandCalls = builder: map (d: d.argNames) (builtins.filter (d: d.builder == builder)
      ([ packages.model ] ++ builtins.attrValues outs.checks.${system}));
  in {
    wrapper = packages.default.makeWrapperArgs;
    dependencies = map (d: d.pname) packages.default.dependencies;
    buildSystem = map (d: d.pname) packages.default.build-system;
    model = packages.model.script;
    src = packages.default.src.outPath;
    formatter = (outs.formatter.${system} or { name = null; }).name;
    # The overlay applied to this system's nixpkgs: the package it gives, as its wrapper.
    overlay = if outs ? overlays then (outs.overlays.default (mkPkgs system) { }).pipeline.makeWrapperArgs else null;
    checkBuilders = builtins.mapAttrs (_: c: c.builder) outs.checks.${system};
    image = if packages ? image then builtins.removeAttrs packages.image [ "outPath" ] else null;
    apps = builtins.mapAttrs (_: a: { inherit (a) type program; description = a.meta.description or ""; })
      outs.apps.${system};
    checks = builtins.mapAttrs (_: c: c.script) outs.checks.${system};
    checkInputs = builtins.mapAttrs (_: c: map (d: d.name) (c.nativeBuildInputs or [ ])) outs.checks.${system};
    checkEnv = builtins.mapAttrs (_: c: builtins.removeAttrs c [ "nativeBuildInputs" "script" "outPath" "name" "argNames" "builder" ]) outs.checks.${system};
    # Argument names per builder call, for the signature check.
    calls = {
      buildPythonApplication = packages.default.argNames;
      mkShell = outs.devShells.${system}.default.argNames;
      runCommand = runCommandCalls "runCommand";
      runCommandCC = runCommandCalls "runCommandCC";
    } // (if packages ? image then { "dockerTools.streamLayeredImage" = packages.image.argNames; } else { });
    shellHook = outs.devShells.${system}.default.shellHook;
    shellPackages = map (p: p.packages) (outs.devShells.${system}.default.packages or [ ]);
  }) outs.packages;
}
