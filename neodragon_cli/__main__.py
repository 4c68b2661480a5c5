from neodragon_cli.main import main

raise SystemExit(main())
