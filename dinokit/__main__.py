from dinokit.cli import main

if __name__ == "__main__":  # guarded: the speed study's worker processes import this module too
    raise SystemExit(main())
