from engine.log import quiet_third_party_imports

quiet_third_party_imports()
