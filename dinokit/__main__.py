from dinokit.cli import main

raise SystemExit(main())
