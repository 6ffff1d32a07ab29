from taylorprune.cli import main

main()
