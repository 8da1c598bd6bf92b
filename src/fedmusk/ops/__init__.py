"""The programs operators run: certificates and site keys, the hospital daemon and its site worker, the coordinator
with its SuperLink and public Fleet proxy, and the supervision of the Flower programs they start."""
