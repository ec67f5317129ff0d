from breastvision.cli import main

raise SystemExit(main())
